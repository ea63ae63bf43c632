"""Granite split over 2 ranks (granite_mlx.parallel) against 1 process, on this machine,
and what the same traffic costs over Thunderbolt 5 between two Macs.

    python benchmarks/parallel_bench.py --workdir DIR [--shape h-350m] [--layers 32]
        [--prompt 64] [--decode 8] [--json OUT.json]
    python benchmarks/parallel_bench.py --workdir - --estimate-only

1. Writes a random-weight checkpoint of the shape (bf16, Hub layout) to DIR once.
2. Times it in one process, then under `mlx.launch -n 2 --backend ring` (loopback)
   in pipeline and in tensor mode: prefill of a prompt, then greedy decode steps,
   with the compiled decode step and with the plain one.
3. Records the bytes each rank sends for one decode token (granite_mlx.parallel.Comm
   logs every collective) and checks them against `traffic_per_token`, the formula
   that then gives H-Small's traffic.
4. Estimates H-Small's decode rate across two Macs from that traffic, published
   Thunderbolt 5 latency/bandwidth figures (see LINKS) and a single-Mac rate scaled
   from the published H-Tiny figure by the bytes each token reads.

On this 2-core CPU machine two ranks are not faster than one process: both
share the same two cores, and MLX's ring backend waits for its sockets by polling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from granite_mlx.config import ModelArgs
from granite_mlx.shapes import shape_config

# Published link figures (README "Several Macs" cites each):
LINKS = {
    # JACCL, RDMA over Thunderbolt 5 (macOS 26.2+): small all-reduce latency 5-9 us
    # (user reports of MLX PR #2808's backend), bandwidth 3.5-3.8 GB/s sustained
    # (mlx issue #3207, M3 Ultra).
    "jaccl": {"latency_s": (5e-6, 9e-6), "bandwidth": (3.5e9, 3.8e9)},
    # The ring backend, TCP over the Thunderbolt bridge: 0.34-0.58 ms ping round trip
    # and 52.6-56.1 Gbit/s iperf3 between two TB5 Macs (exo PR #2063); one message
    # is taken as half a round trip.
    "ring": {"latency_s": (0.17e-3, 0.29e-3), "bandwidth": (6.6e9, 7.0e9)},
}
# Single Mac, MLX 4-bit, M4 Max: H-Tiny 202.2 tok/s (shared/GRANITE.md's published figure),
# and the M4 Max's 546 GB/s memory bandwidth (Apple's figure), the bound no code reaches.
H_TINY_M4_MAX_TOK_S = 202.2
M4_MAX_BANDWIDTH = 546e9


# --------------------------------------------------------------------------
# Traffic, from the shapes
# --------------------------------------------------------------------------


def traffic_per_token(args: ModelArgs, mode: str, n: int, act_bytes: int) -> list[dict]:
    """Per rank, for one decoded token (batch 1): collectives and bytes sent, as
    granite_mlx.parallel issues them and MLX's ring backend moves them."""
    h, v = args.hidden_size, args.vocab_size
    mamba = args.layer_types.count("mamba")
    per = -(-v // n)
    gather_logits = (n - 1) * per * act_bytes
    out = []
    for rank in range(n):
        if mode == "tensor":
            sums = 1 + 2 * args.num_hidden_layers  # embedding, then mixer and MLP of each layer
            sent = sums * 2 * (n - 1) * h * act_bytes / n
            norm = 0 if args.mamba_n_groups % n == 0 else mamba  # Mamba2 norm: sum of squares
            sent += norm * 2 * (n - 1) * max(1, n) * 4 / n  # float32, padded to n elements
            out.append({"collectives": sums + norm + 1, "bytes": int(sent + gather_logits)})
        else:
            send = h * act_bytes if rank < n - 1 else 0  # to the next stage
            sent = send + (n - 1) * h * act_bytes + gather_logits  # last stage's output, logits
            out.append({"collectives": (1 if send else 0) + 2, "bytes": int(sent)})
    return out


def active_bytes(args: ModelArgs, bits: int | None) -> float:
    """Weight bytes one decoded token reads: all but the experts not chosen."""
    from granite_mlx.parallel import rank_weight_bytes

    total = rank_weight_bytes(args, "tensor", 1, bits=bits)[0]
    if not args.use_moe:
        return total
    expert = 3 * args.hidden_size * args.intermediate_size  # gate, up, down
    per_param = 0.5 + 4 / 64 if bits == 4 else 2  # 4-bit + a bf16 scale and bias per 64
    idle = (args.num_local_experts - args.num_experts_per_tok) * args.num_hidden_layers
    return total - idle * expert * per_param


def estimate_h_small(n: int = 2) -> dict:
    """H-Small 4-bit decode across n Macs (M4 Max class) from published figures.

    One Mac's time per token is the bytes a token reads over an effective memory
    bandwidth: H-Tiny's published rate times its bytes per token (what MLX reaches on
    a small MoE), or the full 546 GB/s (an upper bound). Tensor: each Mac reads 1/n of
    them at the same time. Pipeline: the stages run one after the other, so a single
    stream is no faster than one Mac. Then add the collectives' latency and bytes.
    """
    tiny = ModelArgs.from_dict(shape_config("h-tiny"))
    small = ModelArgs.from_dict(shape_config("h-small"))
    read = active_bytes(small, 4)
    bases = {
        "calibrated": H_TINY_M4_MAX_TOK_S * active_bytes(tiny, 4),
        "bandwidth_bound": M4_MAX_BANDWIDTH,
    }
    out: dict = {"active_gb": read / 1e9}
    for base, bandwidth in bases.items():
        single = read / bandwidth  # seconds a token, one Mac
        out[f"single_mac_tok_s/{base}"] = round(1 / single, 1)
        for mode in ("tensor", "pipeline"):
            worst = max(traffic_per_token(small, mode, n, 2), key=lambda t: t["bytes"])
            compute = single / n if mode == "tensor" else single
            for backend, link in LINKS.items():
                # A ring all_sum over n ranks is 2(n-1) messages one after another;
                # JACCL's measured all-reduce latency is for the whole collective.
                hops = 2 * (n - 1) if backend == "ring" and mode == "tensor" else 1
                rates = []
                for latency, bw in zip(link["latency_s"], link["bandwidth"][::-1]):
                    seconds = compute + worst["collectives"] * hops * latency + worst["bytes"] / bw
                    rates.append(round(1 / seconds, 1))
                out[f"{mode}/{backend}/{base}"] = sorted(rates)
            out[f"{mode}/traffic"] = worst
    return out


def print_estimate(estimate: dict) -> None:
    print(f"\nH-Small, 4-bit, 2 Macs (M4 Max class, bf16 activations), {estimate['active_gb']:.2f} "
          "GB read per token:")  # fmt: skip
    bases = ("calibrated", "bandwidth_bound")
    print(
        "| | "
        + " | ".join(f"one Mac: {estimate[f'single_mac_tok_s/{b}']} tok/s ({b})" for b in bases)
        + " |"
    )
    print("|---|---|---|")
    for mode in ("tensor", "pipeline"):
        t = estimate[f"{mode}/traffic"]
        for backend in LINKS:
            ranges = [estimate[f"{mode}/{backend}/{b}"] for b in bases]
            cells = " | ".join(f"{lo}-{hi} tok/s" for lo, hi in ranges)
            print(
                f"| {mode} over {backend} ({t['collectives']} collectives, {t['bytes']} B/token) | {cells} |"
            )


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


def write_checkpoint(folder: Path, shape: str, layers: int) -> Path:
    from granite_mlx.shapes import random_model

    if (folder / "config.json").exists():
        return folder
    config = shape_config(shape)
    if layers < config["num_hidden_layers"]:
        config["layer_types"] = config["layer_types"][:layers]
        config["num_hidden_layers"] = layers
    model = random_model(shape, dtype=mx.bfloat16, **{
        k: config[k] for k in ("layer_types", "num_hidden_layers")
    })  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def measure(folder: Path, parallel: str | None, prompt: int, decode: int) -> dict:
    """Prefill and decode timings on this rank (every rank runs the same)."""
    from granite_mlx import load_model
    from granite_mlx.engine import prefill

    model = load_model(folder, parallel=parallel)
    ids = mx.random.randint(0, model.args.vocab_size, (1, prompt), key=mx.random.key(0))
    result: dict = {"weight_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters()))}
    for compiled in (True, False):
        model.compiled_decode = compiled
        cache = model.make_cache()
        start = time.perf_counter()
        prefill(model, cache, ids[0, :-1].tolist(), 256)
        token = mx.argmax(model(ids[:, -1:], cache)[:, -1:], axis=-1)
        mx.eval(token)
        result.setdefault("prefill_tok_s", prompt / (time.perf_counter() - start))
        steps = []
        for _ in range(decode):
            start = time.perf_counter()
            token = mx.argmax(model(token, cache)[:, -1:], axis=-1)
            mx.eval(token)
            steps.append(time.perf_counter() - start)
        steps.sort()
        result["decode_ms_" + ("compiled" if compiled else "plain")] = 1000 * steps[len(steps) // 2]
    if parallel is not None:
        model.compiled_decode = False  # the plain step issues (and logs) each collective
        model.comm.traffic = []
        mx.eval(model(token, cache))
        result["traffic"] = model.comm.traffic
    return result


def worker(args: argparse.Namespace) -> None:
    out = measure(Path(args.workdir) / "model", args.parallel, args.prompt, args.decode)
    rank = mx.distributed.init().rank()
    (Path(args.workdir) / f"{args.parallel}-rank{rank}.json").write_text(json.dumps(out))


def launch_worker(args: argparse.Namespace, mode: str) -> list[dict]:
    launcher = shutil.which("mlx.launch") or str(Path(sys.base_prefix) / "bin" / "mlx.launch")
    cmd = [
        launcher, "-n", "2", "--backend", "ring", "-p", "45123", sys.executable, __file__,
        "--worker", "--parallel", mode, "--workdir", args.workdir,
        "--prompt", str(args.prompt), "--decode", str(args.decode),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
    return [json.loads((Path(args.workdir) / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--shape", default="h-350m")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--json")
    ap.add_argument("--estimate-only", action="store_true", help="only the H-Small estimate")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.estimate_only:
        return print_estimate(estimate_h_small(2))

    folder = write_checkpoint(Path(args.workdir) / "model", args.shape, args.layers)
    config = ModelArgs.from_dict(json.loads((folder / "config.json").read_text()))
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, mlx {mx.__version__}, "
          f"{mx.default_device()}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"model: {args.shape} shape, {config.num_hidden_layers} layers, bf16 random weights; "
          f"prompt {args.prompt} tokens, {args.decode} decode steps (median)")  # fmt: skip
    results = {"single": measure(folder, None, args.prompt, args.decode)}
    for mode in ("pipeline", "tensor"):
        results[mode] = launch_worker(args, mode)

    single = results["single"]
    print(
        "\n| run | prefill tok/s | decode ms/token (compiled) | decode ms/token (plain) | weights per rank |"
    )
    print("|---|---|---|---|---|")
    print(f"| 1 process | {single['prefill_tok_s']:.1f} | {single['decode_ms_compiled']:.0f} | "
          f"{single['decode_ms_plain']:.0f} | {single['weight_bytes'] / 2**20:.0f} MiB |")  # fmt: skip
    for mode in ("pipeline", "tensor"):
        r0 = results[mode][0]
        per_rank = " / ".join(f"{r['weight_bytes'] / 2**20:.0f}" for r in results[mode])
        print(f"| 2 ranks, {mode} | {r0['prefill_tok_s']:.1f} | {r0['decode_ms_compiled']:.0f} | "
              f"{r0['decode_ms_plain']:.0f} | {per_rank} MiB |")  # fmt: skip

    print("\nbytes sent per decoded token, per rank (measured = formula):")
    for mode in ("pipeline", "tensor"):
        formula = traffic_per_token(config, mode, 2, 2)
        for rank, r in enumerate(results[mode]):
            sent = sum(t[3] for t in r["traffic"])
            ops = len(r["traffic"])
            assert (sent, ops) == (formula[rank]["bytes"], formula[rank]["collectives"]), (
                mode,
                rank,
                sent,
                ops,
                formula[rank],
            )
            print(f"  {mode} rank {rank}: {ops} collectives, {sent} bytes")
        results[mode + "_formula"] = formula

    results["h_small_estimate"] = estimate_h_small(2)
    print_estimate(results["h_small_estimate"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
