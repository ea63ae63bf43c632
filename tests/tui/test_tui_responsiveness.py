"""Keys stay responsive while an answer streams fast."""

from __future__ import annotations

import gc

import pytest
from granite_mlx.tui.app import tune_gc_for_streaming
from granite_mlx.tui.fake_engine import FakeScript
from tui_pilot_helpers import key_delays_while_streaming

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
    app = make_app(FakeScript(delay=0.0005, chunk_chars=4))
    async with app.run_test(size=(100, 32)) as pilot:
        measured = await key_delays_while_streaming(pilot, presses=40)
    worst = max(measured.delays)
    print(
        f"\nworst key delay while streaming: {worst * 1000:.1f} ms "
        f"(answer at {measured.answer_chars} chars, streaming "
        f"{measured.tokens_per_second:.0f} tokens/s)"
    )
    assert worst < WORST_KEY_DELAY_LIMIT
