"""Key-press delay in the chat app while an answer streams fast (the scripted engine).

The same measurement as tests/tui/test_tui_responsiveness.py, repeated: each run
starts the app headless, streams a long answer at several hundred tokens/s, and
presses 40 keys into the message box the way a terminal does (through the driver),
timing each until the box shows it. Prints each run's worst delay and the spread of
all delays, with the machine's load average (the delays follow it on a shared box).

    python benchmarks/tui_key_delay.py --runs 5 | tee benchmarks/results/tui_key_delay_cpu.log
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "tui"))

from granite_mlx.tui.app import GraniteChatApp, tune_gc_for_streaming  # noqa: E402
from granite_mlx.tui.fake_engine import FakeEngine, FakeScript  # noqa: E402
from tui_pilot_helpers import key_delays_while_streaming  # noqa: E402


async def one_run(presses: int) -> tuple[list[float], float]:
    with tempfile.TemporaryDirectory() as folder:
        app = GraniteChatApp(
            "fake/granite",
            engine_factory=lambda emit: FakeEngine(emit, FakeScript(delay=0.0005, chunk_chars=4)),
            data_dir=Path(folder) / "data",
            export_dir=Path(folder),
        )
        async with app.run_test(size=(100, 32)) as pilot:
            measured = await key_delays_while_streaming(pilot, presses)
    return measured.delays, measured.tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--presses", type=int, default=40)
    args = parser.parse_args()
    tune_gc_for_streaming()  # as granite-chat does
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    everything: list[float] = []
    for n in range(args.runs):
        delays, rate = asyncio.run(one_run(args.presses))
        everything += delays
        print(
            f"run {n + 1}: worst {max(delays) * 1000:.1f} ms, median "
            f"{statistics.median(delays) * 1000:.1f} ms, streaming {rate:.0f} tokens/s"
        )
    everything.sort()
    p95 = everything[int(0.95 * (len(everything) - 1))]
    print(
        f"all {len(everything)} presses: median {statistics.median(everything) * 1000:.1f} ms, "
        f"p95 {p95 * 1000:.1f} ms, worst {everything[-1] * 1000:.1f} ms"
    )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
