"""Shared fixtures: the committed reference checkpoints (see make_reference.py).

Float32 products: MLX runs float32 matrix products in TF32 (10-bit mantissa)
on NVIDIA GPUs, and on Apple GPUs that have matrix units (M5 class), unless
MLX_ENABLE_TF32=0. The suite compares float32 results at 1e-5 (the CPU and
older Apple GPUs always compute in full float32), so it switches TF32 off for
itself and for the processes its tests start. MLX reads the variable once, at
the first such product, hence here, before any test module runs.
"""

import os
from pathlib import Path

import pytest

TF32_SWITCH = "MLX_ENABLE_TF32"
os.environ[TF32_SWITCH] = "0"

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINTS = FIXTURES / "checkpoints"
REFERENCE = FIXTURES / "reference"
CASES = ["hybrid_nope", "dense_rope_untied", "moe_hybrid", "groups2", "dt_limit"]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def checkpoint(case: str, layout: str = "hub") -> Path:
    return CHECKPOINTS / case / layout
