"""Prefill time against the model's arithmetic, and peak memory, from 2K to 16K.

    python benchmarks/prefill_scaling.py --shape h-350m --layers 8 \
        --lengths 2048,4096,8192,16384 [--step N] [--json out.json]

For each length: wall time of a chunked prefill (as stream_generate runs it), the
FLOP count of the same work (matrix products, causal attention, the SSD scan),
and the peak memory against weights + KV cache. Two checks follow:
- time(L) / time(first) within 15% of flops(L) / flops(first);
- peak memory <= weights + KV cache + 20% of the weights.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from granite_mlx.bench import _overrides
from granite_mlx.cache import eval_cache
from granite_mlx.engine import default_prefill_step_size, prefill
from granite_mlx.shapes import random_model


def prefill_flops(args, L: int, step: int) -> float:
    """Multiply-adds x 2 for prefilling L tokens in chunks of `step`."""
    H = args.hidden_size
    flops = 0.0
    attn_ctx = 0.0  # sum over chunks of chunk_len * (keys visible), causal
    done = 0
    while done < L:
        n = min(step, L - done)
        attn_ctx += n * done + n * (n + 1) / 2
        done += n
    for kind in args.layer_types:
        if kind == "attention":
            hd, nh, kv = args.head_dim, args.num_attention_heads, args.num_key_value_heads
            flops += 2 * L * H * (nh * hd + 2 * kv * hd) + 2 * L * nh * hd * H
            flops += 2 * 2 * nh * hd * attn_ctx  # scores and values
        else:
            h, p, n, g = args.mamba_n_heads, args.mamba_d_head, args.mamba_d_state, args.mamba_n_groups
            q = args.mamba_chunk_size
            d_in = h * p
            flops += 2 * L * H * (2 * d_in + 2 * g * n + h) + 2 * L * d_in * H
            flops += 2 * L * args.mamba_conv_dim * args.mamba_d_conv
            flops += 2 * L * q * n * g + 2 * L * q * p * h  # intra-chunk C.B^T and scores @ x
            flops += 2 * L * p * n * h * 2  # chunk states and the carried-state readout
        inter = args.shared_intermediate_size
        flops += 2 * L * H * 2 * inter + 2 * L * inter * H
        if args.use_moe:
            k, e = args.num_experts_per_tok, args.intermediate_size
            flops += 2 * L * H * args.num_local_experts + k * (2 * L * H * 2 * e + 2 * L * e * H)
    return flops + 2 * H * args.vocab_size  # the last position's logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="h-350m")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lengths", default="2048,4096,8192,16384")
    ap.add_argument("--step", type=int, default=None, help="default: the device's prefill step")
    ap.add_argument("--json")
    a = ap.parse_args()
    a.step = a.step or default_prefill_step_size()
    ns = argparse.Namespace(shape=a.shape, layers=a.layers)
    model = random_model(a.shape, dtype=mx.bfloat16, **_overrides(ns))
    args = model.args
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    rows = []
    for L in [int(x) for x in a.lengths.split(",")]:
        prompt = mx.random.randint(0, args.vocab_size, (1, L), key=mx.random.key(L))
        mx.eval(prompt)
        cache = model.make_cache()
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        t0 = time.perf_counter()
        prefill(model, cache, prompt[0, :-1].tolist(), a.step)
        logits = model(prompt[:, -1:], cache)  # the first decode step gives the first token
        mx.eval(logits)
        eval_cache(cache)
        seconds = time.perf_counter() - t0
        peak = mx.get_peak_memory() - base + weight_bytes  # weights were resident before
        kv_bytes = sum(v.nbytes for c in cache for v in c.arrays.values())
        rows.append({"tokens": L, "seconds": seconds, "flops": prefill_flops(args, L, a.step),
                     "peak_bytes": peak, "weight_bytes": weight_bytes, "cache_bytes": kv_bytes})  # fmt: skip
        print(f"L={L:6d}: {seconds:8.2f} s, {L / seconds:8.1f} tok/s, peak {peak / 2**20:8.1f} MiB "
              f"(weights {weight_bytes / 2**20:.1f} MiB, cache {kv_bytes / 2**20:.1f} MiB)", flush=True)  # fmt: skip
    first = rows[0]
    print(f"\n{'tokens':>7} {'time ratio':>10} {'FLOP ratio':>10} {'deviation':>9} {'peak/(W+KV)':>12} {'excess/W':>9}")
    for r in rows:
        t_ratio = r["seconds"] / first["seconds"]
        f_ratio = r["flops"] / first["flops"]
        r["time_ratio"], r["flop_ratio"] = t_ratio, f_ratio
        budget = r["weight_bytes"] + r["cache_bytes"]
        r["excess_over_weights"] = (r["peak_bytes"] - budget) / r["weight_bytes"]
        print(f"{r['tokens']:>7} {t_ratio:>10.2f} {f_ratio:>10.2f} {t_ratio / f_ratio - 1:>+9.1%} "
              f"{r['peak_bytes'] / budget:>12.3f} {r['excess_over_weights']:>+9.1%}")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": a.shape, "layers": a.layers, "step": a.step, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
