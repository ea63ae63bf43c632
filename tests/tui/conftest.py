"""Fixtures for the chat app tests: each test gets its own data folder (database,
session files) and export folder, and the scripted fake engine unless it asks for
another."""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# The helper modules sit next to this file and in tests/; make them importable whatever
# the import mode.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))

from granite_mlx.tui.app import GraniteChatApp
from granite_mlx.tui.fake_engine import FakeEngine, FakeScript

REPO = Path(__file__).resolve().parents[2]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests in a fresh event loop (no pytest-asyncio needed)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    return tmp_path / "exports"


@pytest.fixture
def make_app(data_dir: Path, export_dir: Path) -> Callable[..., GraniteChatApp]:
    """make_app(script=FakeScript(...)) -> an app on the fake engine and this test's folders.

    Without a script the fake answers at once (no delay between tokens): tests that
    need an answer to stream for a while pass a script with a delay.
    """

    def make(script: FakeScript | None = None, **kwargs) -> GraniteChatApp:
        script = script or FakeScript(delay=0)
        return GraniteChatApp(
            "fake/granite",
            engine_factory=lambda emit: FakeEngine(emit, script),
            data_dir=data_dir,
            export_dir=export_dir,
            **kwargs,
        )

    return make


@pytest.fixture(scope="session")
def checkpoint_path() -> Path:
    """The tiny checkpoint the real-engine tests load; change it here."""
    return REPO / "tests" / "fixtures" / "checkpoints" / "hybrid_nope" / "hub"
