"""What the decode step spends outside its matrix products, part by part.

    python benchmarks/decode_ablation.py [--shape h-350m] [--repeats 30]

The compiled step of a random-weight model is timed with every matrix product
swapped for a free stand-in (as `granite-mlx bench --profile` does), then with,
in addition, one part of the Mamba2 step dropped: the readout of the state, the
write of the new state, or the whole conv + SSM. Each difference is what that
part costs. Variants are timed in turn, round after round, so machine load hits
them alike; medians. A timing tool only: the variants compute wrong answers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from granite_mlx import bench, ssm
from granite_mlx.shapes import random_model

REFERENCE = ssm.decode_step_reference


def no_readout(xBC, conv_state, *rest):
    _, window, s = REFERENCE(xBC, conv_state, *rest)
    state = rest[6]
    return state[..., 0] * 1.0, window, s  # y stands in, read off the old state's edge


def no_state_write(*args):
    y, window, _ = REFERENCE(*args)
    return y, window, args[8]  # the old state goes back unchanged


def no_conv_or_ssm(xBC, conv_state, *rest):
    state = rest[6]
    h, p = state.shape[1:3]
    return xBC[:, : h * p].astype(mx.float32).reshape(-1, h, p), conv_state, state


VARIANTS = {
    "all but products": REFERENCE,
    "... without the state readout": no_readout,
    "... without the state write": no_state_write,
    "... without conv and SSM": no_conv_or_ssm,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="h-350m")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    model = random_model(a.shape, dtype=mx.bfloat16)
    tok = mx.array([[7]])
    decoders, caches = {}, {}
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    try:
        with bench._products_removed(model, {}):
            for name, fn in VARIANTS.items():  # trace each variant's own compiled step
                ssm.decode_step_reference = fn
                model._decoder = None
                caches[name] = bench._primed(model, model.make_cache)
                mx.eval(model(tok, caches[name]))
                decoders[name] = model._decoder
            for _ in range(a.rounds):
                for name in VARIANTS:
                    model._decoder, cache = decoders[name], caches[name]
                    for _ in range(max(1, a.repeats // a.rounds)):
                        for c in cache:  # keep the context length fixed
                            c.offset -= 1
                        t0 = time.perf_counter()
                        mx.eval(model(tok, cache))
                        times[name].append(time.perf_counter() - t0)
            model._decoder = None
    finally:
        ssm.decode_step_reference = REFERENCE
    base = statistics.median(times["all but products"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:32s} {t * 1e3:7.2f} ms   (part: {(base - t) * 1e3:6.2f} ms)")


if __name__ == "__main__":
    main()
