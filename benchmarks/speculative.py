"""Speculative decoding on a hybrid: what a verification step costs, how the Mamba2
rollback was chosen, and tokens per second plain against speculative.

Random-weight models of the released shapes (granite_mlx.shapes). Acceptance
between two *different* random models is meaningless (they never agree), so the
numbers that carry over to real checkpoints and to other machines are:

* V(l): the time of one target pass over l = k+1 tokens (verifying k drafts)
  divided by the time of the 1-token decode step. It is what a Mac changes:
  where decode is bound by reading the weights (a GPU), V(l) stays near 1 for
  small l; where it is bound by arithmetic, V(l) grows with l.
* c: a draft step's time over a target step's.
* the rollback's cost.

From them the expected speedup at a per-token acceptance rate a is
    E[tokens per step] / (k c + V(k+1) + rollback),  E = (1 - a^(k+1)) / (1 - a)
(Leviathan et al., 2023), tabulated for a = 0.5 .. 0.9.

Measured end to end: the target drafting for itself (acceptance ~100%), the
H-350M shape drafting for a larger target (acceptance ~0 with random weights:
the worst case), prompt lookup on a code-editing prompt (the target forced to
write the edited code, as a model that edits by copying would), and mlx-lm's
speculative generation on the same hybrid, which fails with its own error.

    python benchmarks/speculative.py --target h-350m --draft h-350m \
        [--target-layers N] [--dtype bfloat16] [--k 2,4] [--decode 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from granite_mlx import ssm, stream_generate
from granite_mlx.cache import MambaCache, record, restore, rewind, snapshot
from granite_mlx.shapes import random_model
from granite_mlx.speculative import DraftModel
from granite_mlx.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizer"

CODE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out


def main():
    data = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    for window in (1, 2, 3):
        print(window, moving_average(data, window))
'''
EDITED = CODE.replace("moving_average", "running_mean").replace("window", "width")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() (which evaluates what it computes)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cache_arrays(cache) -> list[mx.array]:
    return [a for c in cache for a in c.arrays.values()]


def primed(model, context: int, seed: int = 0):
    """A cache holding `context` random tokens, evaluated."""
    cache = model.make_cache()
    tokens = mx.random.randint(0, model.args.vocab_size, (1, context), key=mx.random.key(seed))
    model(tokens, cache)
    mx.eval(cache_arrays(cache))
    return cache


def verify_costs(model, lengths, context: int, repeats: int) -> dict[int, float]:
    """Seconds of one pass over l tokens (l = 1: the compiled decode step; l > 1:
    the verification pass, Mamba2 layers recording) at a fixed context."""
    cache = primed(model, context)
    snap = snapshot(cache)

    def one(l):
        tokens = mx.random.randint(0, model.args.vocab_size, (1, l), key=mx.random.key(l))
        restore(cache, snap)
        mx.eval(tokens)
        t, c = time.perf_counter(), time.process_time()
        record(cache, l > 1)
        logits = model(tokens, cache)
        record(cache, False)
        mx.eval(logits, cache_arrays(cache))
        return time.perf_counter() - t, time.process_time() - c

    times: dict[int, list[tuple[float, float]]] = {l: [] for l in lengths}
    for l in lengths:
        one(l)  # warm-up (compile, allocate)
    for r in range(repeats):  # interleaved, so drift in machine load hits every l alike
        for l in lengths if r % 2 == 0 else reversed(lengths):
            times[l].append(one(l))
    out = {
        l: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
        for l, t in times.items()
    }
    for l in lengths:
        log(f"  pass over {l} tokens: {out[l][0] * 1e3:8.1f} ms wall, "
            f"{out[l][1] * 1e3:8.1f} ms CPU")  # fmt: skip
    return out


def rollback_costs(model, l: int, context: int, repeats: int) -> dict:
    """After a pass over l tokens, keeping j of them: the chosen rewind (rebuild the
    state after position j from the recorded inputs), snapshot + replay of the
    kept tokens, and materialising every per-position state (what a mixer that
    returned all l states would write)."""
    cache = primed(model, context)
    snap = snapshot(cache)
    tokens = mx.random.randint(0, model.args.vocab_size, (1, l), key=mx.random.key(99))

    def verify():
        restore(cache, snap)
        record(cache)
        model(tokens, cache)
        record(cache, False)
        mx.eval(cache_arrays(cache))

    res: dict = {"l": l, "rewind_ms": {}, "replay_ms": {}}
    for keep in sorted({1, l // 2, l - 1}):
        times = []
        for _ in range(repeats + 1):
            verify()
            t = time.perf_counter()
            rewind(cache, l - keep)
            mx.eval(cache_arrays(cache))
            times.append(time.perf_counter() - t)
        res["rewind_ms"][keep] = statistics.median(times[1:]) * 1e3

        def replay(keep=keep):
            restore(cache, snap)
            model(tokens[:, :keep], cache)
            mx.eval(cache_arrays(cache))

        replay()
        res["replay_ms"][keep] = timed(replay, repeats) * 1e3
        log(f"  keep {keep}/{l}: rewind {res['rewind_ms'][keep]:7.2f} ms, "
            f"replay {res['replay_ms'][keep]:8.1f} ms")  # fmt: skip
    verify()
    records = [c.recorded for c in cache if isinstance(c, MambaCache)]

    def all_states():
        states = [
            ssm.state_after(r.x[:, :j], r.dt[:, :j], r.A, r.B[:, :j], r.initial_state)
            for r in records
            for j in range(1, l + 1)
        ]
        mx.eval(states)

    all_states()
    res["all_states_ms"] = timed(all_states, repeats) * 1e3
    log(f"  every per-position state ({l} x {len(records)} layers): {res['all_states_ms']:.1f} ms")
    return res


def primitives(model, lengths, context: int) -> dict[int, int]:
    """MLX primitives in the graph of one pass over l tokens (machine-independent:
    on a GPU each is a dispatch, which is what small models spend their time on)."""
    from granite_mlx.bench import count_primitives

    cache = primed(model, context)
    snap = snapshot(cache)
    out = {}
    for l in lengths:
        restore(cache, snap)
        tokens = mx.array([[7] * l], dtype=mx.int32)
        mx.eval(tokens)
        record(cache, l > 1)
        logits = model(tokens, cache)
        record(cache, False)
        out[l] = count_primitives([logits, *cache_arrays(cache)])
        mx.eval(logits, cache_arrays(cache))  # else the next count includes this pass
        log(f"  pass over {l} tokens: {out[l]} primitives")
    return out


def generations(model, tokenizer, prompt, n, repeats, variants: dict[str, dict]) -> dict:
    """For each variant (stream_generate options): median decode tok/s after the
    first token, and the drafted/accepted counts. Variants alternate within each
    repeat, so drift in machine load hits them alike."""

    def run(options):
        last, cpu = None, None
        for last in stream_generate(model, tokenizer, prompt, max_tokens=n, **options):
            if cpu is None:  # from the first token on, as generation_tps
                cpu = time.process_time()
        return last, (time.process_time() - cpu) / max(last.generation_tokens - 1, 1)

    for options in variants.values():  # warm-up: compile, allocate
        for _ in stream_generate(model, tokenizer, prompt, max_tokens=4, **options):
            pass
    runs: dict[str, list] = {name: [] for name in variants}
    for r in range(repeats):
        for name in variants if r % 2 == 0 else reversed(list(variants)):
            last, cpu = run(variants[name])
            runs[name].append((last, cpu))
            log(f"  {name}: {last.generation_tps:.2f} tok/s, {cpu * 1e3:.0f} ms CPU/token")
    out = {}
    for name, pairs in runs.items():
        rs = [r for r, _ in pairs]
        out[name] = {
            "tokens": rs[0].generation_tokens,
            "decode_tps": statistics.median(x.generation_tps for x in rs),
            "cpu_ms_per_token": statistics.median(c for _, c in pairs) * 1e3,
            "drafted": rs[0].drafted_tokens,
            "accepted": rs[0].accepted_tokens,
        }
        out[name]["acceptance"] = rs[0].accepted_tokens / max(rs[0].drafted_tokens, 1)
    return out


def force(ids: list[int], start: int):
    """A logits processor making the model write `ids` after `start` history tokens
    (a pure function of the history, as a drafter needs). It adds a large bonus
    rather than replacing the logits, so the model's forward pass stays in the
    graph and is timed."""

    def processor(history: mx.array, logits: mx.array) -> mx.array:
        i = history.shape[0] - start
        if not 0 <= i < len(ids):
            return logits
        return logits + 1e4 * (mx.arange(logits.shape[-1]) == ids[i])

    return processor


def expected_speedup(V: dict[int, float], c: float, rollback: float, a: float, k: int) -> float:
    tokens = (1 - a ** (k + 1)) / (1 - a)
    return tokens / (k * c + V[k + 1] + rollback)


def speedup_table(V: dict[int, float], c: float, rollback: float) -> list[dict]:
    """Expected speedup for acceptance 0.5 .. 0.9 and every k whose V(k+1) is known."""
    table = []
    for a in (0.5, 0.6, 0.7, 0.8, 0.9):
        row: dict = {"acceptance": a}
        for k in range(1, max(V)):
            if k + 1 in V:
                row[k] = expected_speedup(V, c, rollback, a, k)
        table.append(row)
    return table


def what_if(c: float, flat_v: list[float], ks: list[int]) -> None:
    """The formula alone, for a machine where V(k+1) is not measured: V taken flat."""
    for v in flat_v:
        V = {k + 1: v for k in ks} | {1: 1.0}
        print(f"c = {c}, V(k+1) = {v}:")
        for row in speedup_table(V, c, 0.0):
            cells = "  ".join(f"k={k}: {row[k]:.2f}" for k in ks)
            print(f"  acceptance {row['acceptance']:.1f}: {cells}")


def mlx_lm_attempt(model, tokenizer) -> str:
    """mlx-lm's speculative generation on the same hybrid weights: its error."""
    from mlx_lm.generate import stream_generate as mlx_lm_stream

    from granite_mlx.bench import mlx_lm_twin

    twin = mlx_lm_twin(model)
    try:
        for _ in mlx_lm_stream(twin, tokenizer, "Hello", max_tokens=4, draft_model=twin):
            pass
    except Exception as exc:  # noqa: BLE001 -- whatever it raises is the result
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="h-350m")
    ap.add_argument("--draft", default="h-350m")
    ap.add_argument("--target-layers", type=int, default=None, help="cut the target to N layers")
    ap.add_argument("--draft-layers", type=int, default=None, help="cut the draft to N layers")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=128, help="tokens in the cache when timing")
    ap.add_argument("--lengths", default="1,2,3,4,5,7,9", help="pass lengths l = k+1 to time")
    ap.add_argument("--k", default="2,4", help="draft lengths for the end-to-end runs")
    ap.add_argument("--decode", type=int, default=32, help="tokens per end-to-end run")
    ap.add_argument("--lookup-tokens", type=int, default=48, help="tokens of the code edit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--skip", default="", help="parts to skip (comma list): rollback,e2e,lookup,mlx-lm"
    )
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--what-if", default=None, metavar="C:V1,V2",
        help="only print the expected speedup for draft cost C and flat V values (no model)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.what_if:
        c, vs = args.what_if.split(":")
        what_if(float(c), [float(v) for v in vs.split(",")], [int(k) for k in args.k.split(",")])
        return
    skip = set(filter(None, args.skip.split(",")))
    dtype = getattr(mx, args.dtype)
    lengths = [int(x) for x in args.lengths.split(",")]
    ks = [int(x) for x in args.k.split(",")]

    def cut(shape, layers):
        from granite_mlx.bench import _overrides

        return _overrides(argparse.Namespace(shape=shape, layers=layers)) if layers else {}

    log(f"building {args.target} ({args.dtype}) and {args.draft} ...")
    target = random_model(args.target, dtype=dtype, seed=0, **cut(args.target, args.target_layers))
    same = (args.draft, args.draft_layers) == (args.target, args.target_layers)
    draft = target if same else random_model(
        args.draft, dtype=dtype, seed=1, **cut(args.draft, args.draft_layers)
    )  # fmt: skip
    tokenizer = load_tokenizer(TOKENIZER)
    result: dict = {
        "machine": {"platform": platform.platform(), "device": str(mx.default_device()),
                    "mlx": mx.__version__},
        "target": args.target, "target_layers": target.args.num_hidden_layers,
        "draft": args.draft, "dtype": args.dtype, "context": args.context,
        "repeats": args.repeats, "command": " ".join(sys.argv),
    }  # fmt: skip

    log("graph size, target:")
    result["primitives"] = primitives(target, sorted(set(lengths) | {1}), args.context)
    log("verification pass cost, target:")
    costs = verify_costs(target, sorted(set(lengths) | {1}), args.context, args.repeats)
    V = {l: costs[l][0] / costs[1][0] for l in costs}  # wall clock
    result["target_pass_ms"] = {l: w * 1e3 for l, (w, _) in costs.items()}
    result["target_pass_cpu_ms"] = {l: c * 1e3 for l, (_, c) in costs.items()}
    result["V"] = V
    result["V_cpu"] = {l: costs[l][1] / costs[1][1] for l in costs}
    if same:
        c = c_cpu = 1.0
    else:
        log("draft step cost:")
        wall, cpu = verify_costs(draft, [1], args.context, args.repeats)[1]
        c, c_cpu = wall / costs[1][0], cpu / costs[1][1]
    result["c"], result["c_cpu"] = c, c_cpu
    V_s = {l: w for l, (w, _) in costs.items()}

    rollback = 0.0
    if "rollback" not in skip:
        log(f"rollback, after a pass over {max(lengths)} tokens:")
        rb = rollback_costs(target, max(lengths), args.context, args.repeats)
        result["rollback"] = rb
        rollback = statistics.median(rb["rewind_ms"].values()) / 1e3 / V_s[1]
    result["rollback_over_step"] = rollback

    result["expected_speedup"] = speedup_table(V, c, rollback)
    # The same from CPU time, which waiting for a busy CPU does not inflate.
    result["expected_speedup_cpu"] = speedup_table(result["V_cpu"], c_cpu, rollback)

    prompt = mx.random.randint(0, target.args.vocab_size, (64,), key=mx.random.key(7)).tolist()
    e2e = {}
    if "e2e" not in skip:
        log("end to end, greedy:")
        variants: dict[str, dict] = {"plain": {}}
        for k in ks:
            variants[f"{'self' if same else 'draft'} k={k}"] = {
                "draft_model": DraftModel(draft),
                "num_draft_tokens": k,
            }
        e2e = generations(target, tokenizer, prompt, args.decode, args.repeats, variants)
    if "lookup" not in skip:
        from granite_mlx.chat_format import encode_prompt

        messages = [{"role": "user", "content": "Rename moving_average to running_mean and "
                     "window to width in this code; answer with the whole code.\n\n" + CODE}]  # fmt: skip
        ids = encode_prompt(tokenizer, messages)
        answer = tokenizer.encode(EDITED, add_special_tokens=False)
        n = min(len(answer), args.lookup_tokens)
        forced = [force(answer, len(ids))]
        variants = {"code edit, plain": {"logits_processors": forced}}
        for k in ks:
            variants[f"code edit, prompt lookup k={k}"] = {
                "logits_processors": forced,
                "prompt_lookup": k,
            }
        log(f"code edit ({n} tokens, forced):")
        e2e.update(generations(target, tokenizer, ids, n, args.repeats, variants))
    result["end_to_end"] = e2e
    if "mlx-lm" not in skip:
        result["mlx_lm"] = mlx_lm_attempt(target, tokenizer)
        log(f"mlx-lm speculative generation on this hybrid: {result['mlx_lm']}")

    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
