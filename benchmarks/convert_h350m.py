"""Convert a random-weight H-350M-shape bf16 checkpoint to 4 bits; time, memory, size, quality.

    python benchmarks/convert_h350m.py [--q-bits 4] [--recipe granite] [--workdir DIR]

Writes the source first (Hub layout, bf16, with the real tokenizer files from
tests/fixtures/tokenizer, so the quality report runs on the text sample), then
runs the conversion in a child process so that its peak memory (ru_maxrss) is
its own. Random weights: the quality numbers say how much quantization moves
*this* model's outputs, not how a trained H-350M fares.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from granite_mlx.shapes import count_parameters, random_model

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizer"


def write_source(folder: Path) -> int:
    """A random H-350M in the Hub's layout and spelling; returns its weight bytes."""
    model = random_model("h-350m", dtype=mx.bfloat16)
    weights = {}
    for name, w in tree_flatten(model.parameters()):
        if name.endswith("conv1d.weight"):
            w = w[:, None, :]  # ours (C, K) -> the Hub's (C, 1, K)
        weights[name] = w
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    config = {**model.args.to_hub_dict(), "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, folder / f.name)
    print(f"source: {count_parameters(model):,} parameters, written to {folder}", flush=True)
    return (folder / "model.safetensors").stat().st_size


def child(src: str, out: str, q_bits: int, recipe: str) -> None:
    from granite_mlx.convert import convert

    r = convert(src, out, q_bits=q_bits, recipe=recipe, progress=False)
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": r.seconds,
                "peak": r.peak_memory_bytes,
                "size": r.size_bytes,
                "source": r.source_bytes,
                "table": r.quality.table(),
                "phases": r.phase_seconds,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--q-bits", type=int, default=4)
    ap.add_argument("--recipe", default="granite")
    ap.add_argument("--workdir", type=Path, help="keep the source and output here")
    ap.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child, a.q_bits, a.recipe)

    work = a.workdir or Path(tempfile.mkdtemp(prefix="convert-h350m-"))
    src, out = work / "h-350m-bf16", work / f"h-350m-{a.q_bits}bit"
    try:
        source_bytes = write_source(src)
        cmd = [
            sys.executable,
            __file__,
            "--q-bits",
            str(a.q_bits),
            "--recipe",
            a.recipe,
            "--child",
            str(src),
            str(out),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(proc.stdout + proc.stderr)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        r = json.loads(line[len("RESULT ") :])
        print(f"machine: {platform.machine()}, mlx {mx.__version__}, {mx.default_device()}")
        print(f"command: granite-mlx convert {src} {out} --q-bits {a.q_bits} --recipe {a.recipe}")
        print(f"conversion: {r['seconds']:.1f} s inside convert(), {wall:.1f} s wall with start-up")
        print(
            f"peak memory: mx.get_peak_memory {r['peak'] / 1e9:.2f} GB, "
            f"ru_maxrss {rss / 1e9:.2f} GB"
        )
        print(
            f"size: {r['size'] / 1e6:.1f} MB of weights vs {source_bytes / 1e6:.1f} MB bf16 "
            f"({r['size'] / source_bytes:.1%})"
        )
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items())
        print(f"phases: {phases}")
        print(r["table"])
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
