"""What `fingerprint_weights` costs on a model of the H-350M shape (random bf16
weights, evaluated first, so only the fingerprint is timed).

    python benchmarks/fingerprint_cost.py [--shape h-350m] [--repeats 20]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from granite_mlx.loading import FINGERPRINT_SAMPLES, fingerprint_weights
from granite_mlx.shapes import count_parameters, random_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="h-350m")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    model = random_model(args.shape, dtype=mx.bfloat16)
    fingerprint_weights(model)  # warm: first evaluation of the sample graphs
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        digest = fingerprint_weights(model)
        times.append(time.perf_counter() - t0)
    tensors = len(tree_flatten(model.parameters()))
    print(f"{platform.platform()}, {mx.default_device()}, mlx {mx.__version__}")
    print(f"{args.shape} bf16: {count_parameters(model):,} parameters in {tensors} tensors, "
          f"{FINGERPRINT_SAMPLES} samples per tensor")
    print(f"fingerprint {digest}: median {1e3 * statistics.median(times):.1f} ms, "
          f"min {1e3 * min(times):.1f} ms, max {1e3 * max(times):.1f} ms ({args.repeats} runs)")


if __name__ == "__main__":
    main()
