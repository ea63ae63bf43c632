"""Keys stay responsive while an answer streams fast."""

from __future__ import annotations

import gc
import time

import pytest
from granite_mlx.tui.app import tune_gc_for_streaming
from granite_mlx.tui.fake_engine import FakeScript
from granite_mlx.tui.protocol import SamplingSettings
from tui_pilot_helpers import key, send, views, wait_answer, wait_for, wait_ready, worst_key_delay

# Generous: a key should feel instant (well under 0.1 s); this only catches a UI that
# waits on the model or re-renders the whole answer per token.
WORST_KEY_DELAY_LIMIT = 0.5


@pytest.fixture
def tuned_gc():
    """What ``granite-chat`` does at start-up, undone after the test."""
    thresholds = gc.get_threshold()
    tune_gc_for_streaming()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


async def test_worst_key_delay_while_streaming(make_app, tuned_gc):
    # Token-sized chunks (4 characters) with almost no delay: several hundred tokens/s,
    # faster than a 350M model decodes on a laptop.
    script = FakeScript(delay=0.0005, chunk_chars=4)
    app = make_app(script)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_ready(pilot)
        app.settings = SamplingSettings(max_tokens=1_000_000)
        await send(pilot, "long answer please", wait=False)
        answer = views(app)[-1]
        # Measure on a long document: a UI that re-renders the whole answer per token
        # gets slower as the answer grows.
        await wait_for(pilot, lambda: len(answer.content) > 3000, 30, what="a long answer")
        before, started = len(answer.content), time.perf_counter()
        worst = await worst_key_delay(pilot, presses=40)
        chars_per_second = (len(answer.content) - before) / (time.perf_counter() - started)
        assert app.turn is not None, "the answer was still streaming during the measurement"
        await key(pilot, "escape")
        await wait_answer(pilot)
    print(
        f"\nworst key delay while streaming: {worst * 1000:.1f} ms "
        f"(answer at {before} chars, streaming {chars_per_second / script.chunk_chars:.0f} "
        f"tokens/s)"
    )
    assert worst < WORST_KEY_DELAY_LIMIT
