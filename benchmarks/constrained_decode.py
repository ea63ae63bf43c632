"""What a JSON Schema constraint costs per token: H-350M shape, the real 100k vocabulary.

A random-weight H-350M (bf16) with the real Granite tokenizer decodes --tokens
tokens after a short chat prompt, alternately without and with a JSON Schema
constraint (a list of records: objects, bounded integers, enums, strings), for
--repeats rounds, all in one run. Reported:

* decode tok/s of each run (the engine's ``generation_tps``: tokens after the
  first over their time), the median per mode, and the slowdown;
* every ``mask()`` call of the constrained runs, in microseconds: the host work
  the engine overlaps with the model step (on a GPU it costs no wall time as
  long as it is shorter than the step).

    python benchmarks/constrained_decode.py [--tokens 32] [--repeats 3]
        [--json benchmarks/results/constrained_decode_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from granite_mlx import stream_generate
from granite_mlx.constrain import build_constraint
from granite_mlx.shapes import random_model
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
PROMPT = [{"role": "user", "content": "List the open tickets as JSON records."}]


class Timed:
    """A constraint that records how long each mask() takes."""

    def __init__(self, inner):
        self.inner = inner
        self.mask_seconds: list[float] = []

    def mask(self) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.inner.mask()
        self.mask_seconds.append(time.perf_counter() - t0)
        return out

    def advance(self, token: int) -> None:
        self.inner.advance(token)

    def is_finished(self) -> bool:
        return self.inner.is_finished()


def decode(model, tokenizer, tokens: int, constraint) -> tuple[float, int, str | None]:
    last = None
    for last in stream_generate(
        model, tokenizer, PROMPT, max_tokens=tokens, response_format=constraint
    ):
        pass
    return last.generation_tps, last.generation_tokens, last.finish_reason


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="h-350m")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
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

    runs: dict[str, list[float]] = {"free": [], "json_schema": []}
    masks: list[float] = []
    compiles: list[float] = []
    for r in range(a.repeats):
        for mode in ("free", "json_schema"):
            constraint = None
            if mode == "json_schema":
                t0 = time.perf_counter()
                constraint = Timed(build_constraint(tokenizer, SCHEMA))
                compiles.append(time.perf_counter() - t0)
            tps, n, finish = decode(model, tokenizer, a.tokens, constraint)
            runs[mode].append(tps)
            line = f"round {r + 1} {mode:11s} {n} tokens ({finish}): {tps:.3f} tok/s"
            if constraint is not None:
                masks += constraint.mask_seconds
                m = sorted(s * 1e6 for s in constraint.mask_seconds)
                line += f", mask median {m[len(m) // 2]:.1f} us, max {m[-1]:.1f} us"
            print(line)

    free, constrained = statistics.median(runs["free"]), statistics.median(runs["json_schema"])
    slowdown = (free / constrained - 1) * 100
    mask_us = sorted(s * 1e6 for s in masks)
    step_ms = 1000 / free
    print(f"\ndecode, median of {a.repeats}: free {free:.3f} tok/s, JSON Schema {constrained:.3f} "
          f"tok/s: {slowdown:+.2f}% time per token")  # fmt: skip
    print(f"mask() over {len(mask_us)} tokens: median {statistics.median(mask_us):.1f} us, "
          f"p99 {mask_us[int(0.99 * (len(mask_us) - 1))]:.1f} us, max {mask_us[-1]:.1f} us "
          f"(the model step: {step_ms:.0f} ms)")  # fmt: skip
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
            "decode_tps": runs,
            "decode_tps_median": {"free": free, "json_schema": constrained},
            "slowdown_percent": slowdown,
            "mask_us": {
                "median": statistics.median(mask_us),
                "p99": mask_us[int(0.99 * (len(mask_us) - 1))],
                "max": mask_us[-1],
                "count": len(mask_us),
            },
            "compile_ms_median": statistics.median(compiles) * 1e3,
        }
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
