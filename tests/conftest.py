"""Shared fixtures: the committed reference checkpoints (see make_reference.py)."""

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINTS = FIXTURES / "checkpoints"
REFERENCE = FIXTURES / "reference"
CASES = ["hybrid_nope", "dense_rope_untied", "moe_hybrid", "groups2", "dt_limit"]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def checkpoint(case: str, layout: str = "hub") -> Path:
    return CHECKPOINTS / case / layout
