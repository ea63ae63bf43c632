"""What a JSON Schema constraint costs per token: H-350M shape, the real 100k vocabulary.

A random-weight H-350M (bf16) with the real Granite tokenizer decodes --tokens
tokens after a short prompt, alternately without and with a JSON Schema
constraint (a list of records: objects, bounded integers, enums, strings), for
--repeats rounds, all in one run. Reported:

* the time of every decode step (between two streamed tokens; the first token,
  which comes with the prefill, is left out), the median per mode, the decode
  rate it gives and the slowdown. Short runs, many rounds, and medians over
  steps: on a machine shared with other work the load comes in bursts, and a
  burst then spoils a few steps of both modes instead of one whole run;
* every ``mask()`` call of the constrained runs, in microseconds: the host work
  the engine overlaps with the model step (on a GPU it costs no wall time as
  long as it is shorter than the step). On this CPU backend the model step runs
  on the same cores, so the two compete; the same tokens are therefore also
  replayed through a fresh constraint with no model running ("alone"). Both
  wall time and the thread's CPU time are kept: on a shared, loaded machine the
  wall time of a 10 us call also catches the scheduler's time slices;
* the host work a constrained token adds, part by part, timed alone (medians):
  mask(), turning the mask into a (1, vocab) array (the engine's
  ``_mask_array``), the masked sampling path against the free greedy one on
  (1, vocab) logits, and advance() plus the text of a token (which the
  constrained path does before queuing the next step, where the free path
  overlaps it). Their sum over the free step time bounds the slowdown from
  above even if nothing overlapped: on a loaded shared machine the end-to-end
  difference of two noisy step times cannot resolve 2%.

    python benchmarks/constrained_decode.py [--tokens 16] [--repeats 8]
        [--json benchmarks/results/constrained_decode_cpu.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from granite_mlx import stream_generate
from granite_mlx.constrain import build_constraint
from granite_mlx.engine import _mask_array
from granite_mlx.shapes import random_model
from granite_mlx.text import TextAssembler
from granite_mlx.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizer"

# At least 20 records: long enough for any --tokens up to a few hundred, and the
# mask goes through every kind of state (keys, numbers, enums, strings, commas).
SCHEMA = {
    "type": "array",
    "minItems": 20,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 9999},
            "name": {"type": "string", "maxLength": 24},
            "status": {"enum": ["open", "closed", "pending"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01},
        },
        "required": ["id", "name", "status", "score"],
        "additionalProperties": False,
    },
}
PROMPT = "Open tickets as JSON records:"  # short: the runs are about decoding


class Timed:
    """A constraint that records how long each mask() takes, and the tokens taken."""

    def __init__(self, inner):
        self.inner = inner
        self.mask_seconds: list[float] = []  # wall
        self.mask_cpu_seconds: list[float] = []  # this thread's CPU time
        self.tokens: list[int] = []

    def mask(self) -> np.ndarray:
        t0, c0 = time.perf_counter(), time.thread_time()
        out = self.inner.mask()
        self.mask_cpu_seconds.append(time.thread_time() - c0)
        self.mask_seconds.append(time.perf_counter() - t0)
        return out

    def advance(self, token: int) -> None:
        self.tokens.append(token)
        self.inner.advance(token)

    def is_finished(self) -> bool:
        return self.inner.is_finished()


def replay(tokenizer, tokens: list[int]) -> Timed:
    """mask() times over the same tokens, with nothing else running."""
    timed = Timed(build_constraint(tokenizer, SCHEMA))
    for token in tokens:
        timed.mask()
        timed.advance(token)
    return timed


def percentiles(seconds: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in seconds)
    return {
        "median": statistics.median(us),
        "p99": us[int(0.99 * (len(us) - 1))],
        "max": us[-1],
        "count": len(us),
    }


def median_us(fn, repeats: int = 200) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def components(tokenizer, tokens: list[int], vocab: int) -> dict[str, float]:
    """Median microseconds of each piece of host work a constrained token adds."""
    timed = replay(tokenizer, tokens)
    words = build_constraint(tokenizer, SCHEMA).mask().copy()
    logits = mx.random.normal((1, vocab))
    mask = _mask_array(words, vocab)
    mx.eval(logits, mask)

    def free():  # the engine's greedy fast path
        t = mx.argmax(logits, axis=-1)
        mx.eval(t, mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0] - mx.logsumexp(logits))

    def masked():  # its general path with a mask
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        t = mx.argmax(mx.where(mask, lp, -mx.inf), axis=-1)
        mx.eval(t, mx.take_along_axis(lp, t[:, None], axis=-1)[:, 0])

    def advance_and_text():
        c = build_constraint(tokenizer, SCHEMA)
        text = TextAssembler(tokenizer)
        t0 = time.perf_counter()
        for token in tokens:
            c.mask()
            c.advance(token)
            text.add(token)
        total = time.perf_counter() - t0
        return (total - sum(replay(tokenizer, tokens).mask_seconds)) / len(tokens) * 1e6

    return {
        "mask": statistics.median(timed.mask_seconds) * 1e6,
        "mask_to_array": median_us(lambda: _mask_array(words, vocab)),
        "masked_sampling_extra": max(0.0, median_us(masked) - median_us(free)),
        "advance_and_text": statistics.median(advance_and_text() for _ in range(5)),
    }


def decode(model, tokenizer, tokens: int, constraint) -> tuple[list[float], str | None]:
    """The decode steps' times (after the first token) and how the answer ended."""
    stamps, last = [], None
    for last in stream_generate(
        model, tokenizer, PROMPT, max_tokens=tokens, response_format=constraint
    ):
        stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)], last.finish_reason


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="h-350m")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()

    tokenizer = load_tokenizer(TOKENIZER)
    t0 = time.perf_counter()
    model = random_model(a.shape, dtype=mx.bfloat16)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, mlx {mx.__version__}, "
          f"{mx.default_device()}")  # fmt: skip
    print(f"{a.shape} bf16 random weights (built in {time.perf_counter() - t0:.1f} s), "
          f"real tokenizer ({model.args.vocab_size} ids)")  # fmt: skip
    t0 = time.perf_counter()
    build_constraint(tokenizer, SCHEMA)  # the tokenizer bridge, once per tokenizer
    print(f"tokenizer bridge + first compile: {time.perf_counter() - t0:.2f} s")
    decode(model, tokenizer, 4, None)  # warm-up: compile the decode step

    steps: dict[str, list[float]] = {"free": [], "json_schema": []}
    masks: dict[str, list[float]] = {"during": [], "during_cpu": [], "alone": [], "alone_cpu": []}
    compiles: list[float] = []
    for r in range(a.repeats):
        for mode in ("free", "json_schema"):
            constraint = None
            if mode == "json_schema":
                t0 = time.perf_counter()
                constraint = Timed(build_constraint(tokenizer, SCHEMA))
                compiles.append(time.perf_counter() - t0)
            times, finish = decode(model, tokenizer, a.tokens, constraint)
            steps[mode] += times
            line = (f"round {r + 1} {mode:11s} {len(times) + 1} tokens ({finish}): step median "
                    f"{statistics.median(times) * 1e3:.1f} ms")  # fmt: skip
            if constraint is not None:
                solo = replay(tokenizer, constraint.tokens)
                masks["during"] += constraint.mask_seconds
                masks["during_cpu"] += constraint.mask_cpu_seconds
                masks["alone"] += solo.mask_seconds
                masks["alone_cpu"] += solo.mask_cpu_seconds
                m = percentiles(constraint.mask_seconds)
                line += f", mask median {m['median']:.1f} us, max {m['max']:.1f} us"
            print(line, f"(load average {os.getloadavg()[0]:.1f})")

    free, constrained = (statistics.median(steps[m]) * 1e3 for m in ("free", "json_schema"))
    slowdown = (constrained / free - 1) * 100
    stats = {k: percentiles(v) for k, v in masks.items()}
    parts = components(tokenizer, constraint.tokens, model.args.vocab_size)
    added = sum(parts.values())
    print(f"\ndecode step, median of {len(steps['free'])} / {len(steps['json_schema'])} steps: "
          f"free {free:.1f} ms ({1e3 / free:.3f} tok/s), JSON Schema {constrained:.1f} ms "
          f"({1e3 / constrained:.3f} tok/s): {slowdown:+.2f}% time per token")  # fmt: skip
    for key, label in [
        ("during", "during the model step, wall"), ("during_cpu", "during the model step, CPU"),
        ("alone", "alone, wall"), ("alone_cpu", "alone, CPU"),
    ]:  # fmt: skip
        m = stats[key]
        print(f"mask() {label:30s} {m['count']} tokens: median {m['median']:8.1f} us, "
              f"p99 {m['p99']:8.1f} us, max {m['max']:8.1f} us")  # fmt: skip
    print("host work a constrained token adds, timed alone (median us): " + ", ".join(
        f"{k} {v:.1f}" for k, v in parts.items()
    ) + f"; sum {added:.1f} us = {added / 1e3 / free * 100:.3f}% of the free step")  # fmt: skip
    print(f"schema compile per request: median {statistics.median(compiles) * 1e3:.2f} ms")
    if a.json:
        report = {
            "machine": platform.machine(),
            "mlx": mx.__version__,
            "device": str(mx.default_device()),
            "shape": a.shape,
            "tokens": a.tokens,
            "repeats": a.repeats,
            "schema": SCHEMA,
            "step_ms": {m: [t * 1e3 for t in v] for m, v in steps.items()},
            "step_ms_median": {"free": free, "json_schema": constrained},
            "decode_tps_median": {"free": 1e3 / free, "json_schema": 1e3 / constrained},
            "slowdown_percent": slowdown,
            "mask_us": stats,
            "added_host_us": parts,
            "added_host_percent_of_free_step": added / 1e3 / free * 100,
            "load_average_end": os.getloadavg()[0],
            "compile_ms_median": statistics.median(compiles) * 1e3,
        }
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
