"""Time a 256-token prefill and 8 decode steps of a random-weight H-350M (bf16).

    python benchmarks/real_shape_smoke.py [--shape h-350m] [--prompt 256] [--decode 8]
"""

import argparse
import platform
import time

import mlx.core as mx

from granite_mlx.engine import prefill
from granite_mlx.shapes import random_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="h-350m")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=8)
    a = ap.parse_args()
    t0 = time.perf_counter()
    model = random_model(a.shape, dtype=mx.bfloat16)
    build = time.perf_counter() - t0
    cache = model.make_cache()
    prompt = mx.random.randint(0, model.args.vocab_size, (1, a.prompt), key=mx.random.key(0))
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    # As stream_generate does it: chunked prefill, the last token through the decode step.
    prefill(model, cache, prompt[0, :-1].tolist(), 512)
    tok = mx.argmax(model(prompt[:, -1:], cache)[:, -1:], axis=-1)
    mx.eval(tok)
    seconds = time.perf_counter() - t0
    times = []
    for _ in range(a.decode):
        t0 = time.perf_counter()
        tok = mx.argmax(model(tok, cache)[:, -1:], axis=-1)
        mx.eval(tok)
        times.append(time.perf_counter() - t0)
    times.sort()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, mlx {mx.__version__}, {mx.default_device()}")
    print(f"{a.shape} bf16 random weights, built in {build:.1f} s")
    print(f"prefill {a.prompt} tokens: {seconds:.2f} s ({a.prompt / seconds:.1f} tok/s)")
    print(f"decode {a.decode} steps: median {times[len(times) // 2] * 1000:.0f} ms/token")
    print(f"peak memory: {mx.get_peak_memory() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
