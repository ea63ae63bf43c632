"""`granite-mlx bench`: granite-mlx against mlx-lm on the same weights, same run.

    granite-mlx bench --shape h-350m --prompts 512,2048 --decode 64 --repeats 3 \
        [--q-bits 4] [--json out.json] [--plot out.png]
    granite-mlx bench --model /path/to/checkpoint ...

For each prompt length it measures prefill tok/s, then decode tok/s and peak
memory, alternating the two runtimes within each repeat (so drift in machine
load hits both alike) and reporting medians and ratios (ours / mlx-lm).
`--profile` adds the machine-independent numbers: primitives per decode step
(counted from the graph) and the share of a decode step spent outside matrix
products.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from .cli import ArgumentParser, whole_number
from .engine import Engine, Request, default_prefill_step_size
from .errors import GraniteError
from .model import Model
from .weights import mlx_lm_module_paths, to_mlx_lm_layout

# --------------------------------------------------------------------------- models


def mlx_lm_twin(model: Model):
    """mlx-lm's own granitemoehybrid model holding exactly our weights."""
    from mlx_lm.models import granitemoehybrid as theirs

    config = model.args.to_hub_dict()
    config["time_step_limit"] = list(model.args.time_step_limit)  # else mlx-lm clamps dt
    twin = theirs.Model(theirs.ModelArgs.from_dict(config))
    weights = to_mlx_lm_layout(dict(tree_flatten(model.parameters())), model.args)
    params = _quant_params(model)
    if params:

        def predicate(path, module):
            return params.get(path, False) if hasattr(module, "to_quantized") else False

        nn.quantize(twin, class_predicate=predicate)
    twin.load_weights(list(weights.items()), strict=True)
    twin.eval()
    mx.eval(twin.parameters())
    return twin


def _quant_params(model: Model) -> dict[str, dict]:
    """mlx-lm module path -> quantization settings, for each of our quantized modules."""
    out = {}
    for path, m in model.named_modules():
        if hasattr(m, "bits") and hasattr(m, "group_size"):
            for theirs in mlx_lm_module_paths(path, model.args):
                out[theirs] = {"group_size": m.group_size, "bits": m.bits}
    return out


def build_models(args) -> tuple[Model, object]:
    if args.model:
        from .loading import load_model

        ours = load_model(args.model, dtype=None if args.q_bits else args.dtype)
    else:
        from .shapes import random_model

        ours = random_model(args.shape, dtype=getattr(mx, args.dtype), **_overrides(args))
    if args.q_bits and not any(k.endswith(".scales") for k, _ in tree_flatten(ours.parameters())):
        def small(path, m):  # conv, norms, A_log... are not Linear; the router stays 8-bit
            if not hasattr(m, "to_quantized"):
                return False
            if path.endswith("router.layer"):
                return {"group_size": 64, "bits": 8}
            return True

        nn.quantize(ours, group_size=args.q_group_size, bits=args.q_bits, class_predicate=small)
        mx.eval(ours.parameters())
    return ours, mlx_lm_twin(ours)


def _overrides(args) -> dict:
    """Keep only `args.layers` layers, attention spread as in the full shape (at
    least one attention layer when the shape has any)."""
    if not args.layers:
        return {}
    from .shapes import SHAPES

    kinds = SHAPES[args.shape]["layer_types"]
    n_att = kinds.count("attention")
    if n_att:
        n_att = max(1, round(args.layers * n_att / len(kinds)))
    at = {int((j + 0.5) * args.layers / n_att) for j in range(n_att)} if n_att else set()
    layer_types = ["attention" if i in at else "mamba" for i in range(args.layers)]
    return {"num_hidden_layers": args.layers, "layer_types": layer_types}


# --------------------------------------------------------------------------- timing


class _NoText:
    """A tokenizer stand-in for the engine: random ids need no text, and timing the
    detokenizer is not the point (neither side does it here)."""

    eos_token_ids: set = set()

    class detokenizer:  # noqa: N801 - the attribute TextAssembler reads
        last_segment = ""

        @staticmethod
        def add_token(token):
            pass

        @staticmethod
        def finalize():
            pass


def _ours_generate(model: Model, prompt: mx.array, n: int, step: int):
    """Our generation loop as every client runs it: one request through the engine
    (chunked prefill of all but the last token, then one decode step per token)."""
    engine = Engine(model, _NoText(), max_batch=1, prefill_step_size=step)
    engine.add(Request(prompt=prompt[0].tolist(), max_tokens=n + 1))
    t0 = time.perf_counter()
    t1 = None
    while engine.has_work:
        for _, response in engine.step():
            if t1 is None:
                t1 = time.perf_counter()  # the first token: prefill done
    return t1 - t0, time.perf_counter() - t1


def _theirs_generate(model, prompt: mx.array, n: int, step: int):
    """mlx-lm's generate_step, which is how mlx-lm itself generates."""
    from mlx_lm.generate import generate_step

    t0 = time.perf_counter()
    gen = generate_step(prompt[0], model, max_tokens=n + 1, prefill_step_size=step)
    next(gen)
    t1 = time.perf_counter()
    for _ in gen:
        pass
    return t1 - t0, time.perf_counter() - t1


def run(args) -> dict:
    ours, theirs = build_models(args)
    vocab = ours.args.vocab_size
    lengths = _lengths(args.prompts) if isinstance(args.prompts, str) else list(args.prompts)
    impls = {"granite-mlx": (_ours_generate, ours), "mlx-lm": (_theirs_generate, theirs)}
    runs: dict = {name: {L: [] for L in lengths} for name in impls}
    for L in lengths:
        prompt = mx.random.randint(0, vocab, (1, L), key=mx.random.key(L))
        for name, (fn, m) in impls.items():  # warm-up: compile, allocate
            fn(m, prompt[:, : min(L, 64)], 2, args.prefill_step)
        for r in range(args.repeats):
            order = list(impls) if r % 2 == 0 else list(reversed(impls))
            for name in order:
                fn, m = impls[name]
                mx.clear_cache()
                mx.reset_peak_memory()
                t_pre, t_dec = fn(m, prompt, args.decode, args.prefill_step)
                runs[name][L].append(
                    {"prefill_tps": L / t_pre, "decode_tps": args.decode / t_dec,
                     "peak_gib": mx.get_peak_memory() / 2**30}
                )  # fmt: skip
                print(f"  {name:12s} L={L:6d} rep {r}: prefill {L / t_pre:9.1f} tok/s, "
                      f"decode {args.decode / t_dec:7.2f} tok/s", file=sys.stderr)  # fmt: skip
    table = []
    for L in lengths:
        row = {"prompt": L}
        for name in impls:
            for key in ("prefill_tps", "decode_tps", "peak_gib"):
                row[f"{name}:{key}"] = statistics.median(x[key] for x in runs[name][L])
        for key in ("prefill_tps", "decode_tps"):
            row[f"ratio:{key}"] = row[f"granite-mlx:{key}"] / row[f"mlx-lm:{key}"]
        table.append(row)
    result = {
        "machine": machine(),
        "model": args.model or args.shape,
        "layers": ours.args.num_hidden_layers,
        "dtype": f"{args.q_bits}-bit" if args.q_bits else args.dtype,
        "decode_tokens": args.decode,
        "prefill_step": args.prefill_step,
        "repeats": args.repeats,
        "table": table,
        "runs": runs,
    }
    if args.profile:
        result["profile"] = profile(ours, theirs)
    return result


def machine() -> dict:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": str(mx.default_device()),
        "device_name": str(info.get("device_name", "")),
        "mlx": mx.__version__,
    }


# --------------------------------------------------------------------------- profile


def count_primitives(outputs: list[mx.array]) -> int:
    """Primitives in the graph that produces `outputs` (inputs already evaluated)."""
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        return len(re.findall(r"shape=rectangle", Path(f.name).read_text()))


def _primed(model, make_cache, context: int = 32):
    cache = make_cache()
    prompt = mx.random.randint(0, 1000, (1, context), key=mx.random.key(1))
    model(prompt, cache)
    states = [a for c in cache for a in _cache_arrays(c)]
    mx.eval(states)
    return cache


def _cache_arrays(c) -> list[mx.array]:
    if hasattr(c, "arrays"):
        return list(c.arrays.values())
    return [a for _, a in tree_flatten(c.state) if isinstance(a, mx.array)]


def decode_graph_size(model, make_cache) -> int:
    cache = _primed(model, make_cache)
    tok = mx.array([[7]])
    mx.eval(tok)
    logits = model(tok, cache)
    return count_primitives([logits] + [a for c in cache for a in _cache_arrays(c)])


class _FreeProduct(nn.Module):
    """Stands in for a matrix product: the same output shape, for the cost of one
    broadcast multiply (so the ops that follow still run, on real-sized arrays)."""

    def __init__(self, out_dims: int, dtype):
        super().__init__()
        self.ones = mx.ones((out_dims,), dtype)

    def __call__(self, x: mx.array) -> mx.array:
        return x[..., :1] * self.ones


PRODUCTS = (nn.Linear, nn.QuantizedLinear)


def _activation_dtype(model) -> mx.Dtype:
    """The dtype activations run in: the final norm's (norms are never quantized,
    while a quantized embedding's weight is uint32)."""
    return model.model.norm.weight.dtype


@contextlib.contextmanager
def _products_removed(model, stash: dict):
    """Every Linear / QuantizedLinear, and a tied head, replaced by a `_FreeProduct`;
    all restored on leaving. Works on our model and on mlx-lm's alike. Our compiled
    step is traced anew for the stand-ins, once: `stash` keeps it between entries."""
    dtype = _activation_dtype(model)
    originals = [(p, m) for p, m in model.named_modules() if isinstance(m, PRODUCTS)]
    model.update_modules(tree_unflatten([(p, _FreeProduct(m.weight.shape[0], dtype)) for p, m in originals]))
    embedding = model.model.embed_tokens
    object.__setattr__(embedding, "as_linear", _FreeProduct(embedding.weight.shape[0], dtype))
    compiled = "_decoder" in model.__dict__
    if compiled:
        real, model._decoder = model._decoder, stash.get("decoder")
    try:
        yield
    finally:
        if compiled:
            stash["decoder"], model._decoder = model._decoder, real
        object.__delattr__(embedding, "as_linear")
        model.update_modules(tree_unflatten(originals))


def matmul_share(model, make_cache: Callable | None = None, repeats: int = 30, rounds: int = 5) -> dict:
    """A decode step's time split in two, measured directly: the whole step, and
    the same step with every matrix product (Linear, head) replaced by a free
    stand-in, i.e. everything else. The share outside products is rest / step (not
    a small difference of two large times). The products alone at their decode
    shapes are timed too, as a cross-check (products + rest ~= step).

    Timed in `rounds` rounds of `repeats` / `rounds` runs of each, so machine load
    hits all three alike; medians. Any model with `model.model.embed_tokens` and
    Linear products: ours (compiled step) or mlx-lm's."""
    make_cache = make_cache or model.make_cache
    tok = mx.array([[7]])

    def stepper(cache):
        def step():
            mx.eval(model(tok, cache))
            for c in cache:  # keep the context length fixed
                if hasattr(c, "offset"):
                    c.offset -= 1

        return step

    step = stepper(_primed(model, make_cache))
    rest = stepper(_primed(model, make_cache))
    products = [m for _, m in model.named_modules() if isinstance(m, PRODUCTS)]
    dtype = _activation_dtype(model)
    x_for = {id(m): mx.random.normal((1, 1, m.weight.shape[1] * (32 // getattr(m, "bits", 32))))
             .astype(dtype) for m in products}  # fmt: skip
    hx = mx.random.normal((1, model.args.hidden_size)).astype(dtype)
    mx.eval(list(x_for.values()), hx)
    tied = not any(p == "lm_head" for p, _ in model.named_modules())
    head = model.model.embed_tokens.as_linear

    def only_products():
        outs = [m(x_for[id(m)]) for m in products]
        if tied:
            outs.append(head(hx))
        mx.eval(outs)

    times: dict[str, list[float]] = {"step": [], "rest": [], "products": []}
    stash: dict = {}

    def timed(name, fn, n):
        fn()  # warm (and, the first time, trace and compile)
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        timed("step", step, per_round)
        timed("products", only_products, per_round)
        with _products_removed(model, stash):
            timed("rest", rest, per_round)
    t = {k: statistics.median(v) for k, v in times.items()}
    return {"step_ms": t["step"] * 1e3, "outside_matmul_ms": t["rest"] * 1e3,
            "matmul_ms": t["products"] * 1e3, "outside_matmul_share": t["rest"] / t["step"]}  # fmt: skip


def profile(ours: Model, theirs) -> dict:
    """Graph sizes of our decode step (compiled, and the plain modules it replaces),
    mlx-lm's, and our step's time outside matrix products."""
    default = ours.compiled_decode
    ours.compiled_decode = True
    ours_graph = decode_graph_size(ours, ours.make_cache)
    ours.compiled_decode = False
    plain_graph = decode_graph_size(ours, ours.make_cache)
    ours.compiled_decode = default
    theirs_graph = decode_graph_size(theirs, theirs.make_cache)
    return {
        "primitives_per_decode_step": {
            "granite-mlx": ours_graph, "granite-mlx-uncompiled": plain_graph, "mlx-lm": theirs_graph,
            "ratio": ours_graph / theirs_graph,
        },
        "decode_step_breakdown": matmul_share(ours),
        "mlx_lm_decode_step_breakdown": matmul_share(theirs),
    }  # fmt: skip


# --------------------------------------------------------------------------- output


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"{result['model']} ({result['layers']} layers), {result['dtype']}, "
          f"{m['device']} {m['device_name'] or m['processor']}, mlx {m['mlx']}")  # fmt: skip
    print(f"{'prompt':>7} | {'prefill tok/s ours':>18} {'mlx-lm':>9} {'ratio':>6} | "
          f"{'decode tok/s ours':>17} {'mlx-lm':>8} {'ratio':>6} | {'peak GiB ours':>13} {'mlx-lm':>7}")  # fmt: skip
    for r in result["table"]:
        print(f"{r['prompt']:>7} | {r['granite-mlx:prefill_tps']:>18.1f} {r['mlx-lm:prefill_tps']:>9.1f} "
              f"{r['ratio:prefill_tps']:>6.2f} | {r['granite-mlx:decode_tps']:>17.2f} "
              f"{r['mlx-lm:decode_tps']:>8.2f} {r['ratio:decode_tps']:>6.2f} | "
              f"{r['granite-mlx:peak_gib']:>13.2f} {r['mlx-lm:peak_gib']:>7.2f}")  # fmt: skip
    if "profile" in result:
        p = result["profile"]
        g, b = p["primitives_per_decode_step"], p["decode_step_breakdown"]
        print(f"primitives per decode step: ours {g['granite-mlx']} (uncompiled "
              f"{g['granite-mlx-uncompiled']}), mlx-lm {g['mlx-lm']}, ratio {g['ratio']:.3f}")
        print(f"decode step {b['step_ms']:.1f} ms: without its matrix products "
              f"{b['outside_matmul_ms']:.1f} ms ({100 * b['outside_matmul_share']:.1f}%), "
              f"the products alone {b['matmul_ms']:.1f} ms")
        b = p.get("mlx_lm_decode_step_breakdown")
        if b:
            print(f"mlx-lm decode step {b['step_ms']:.1f} ms: without its matrix products "
                  f"{b['outside_matmul_ms']:.1f} ms ({100 * b['outside_matmul_share']:.1f}%)")


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install 'granite-mlx[bench]'", file=sys.stderr)
        return
    rows = result["table"]
    xs = [r["prompt"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ["prefill_tps", "decode_tps", "peak_gib"],
                              ["prefill tok/s", "decode tok/s", "peak memory (GiB)"]):  # fmt: skip
        for name in ("granite-mlx", "mlx-lm"):
            ax.plot(xs, [r[f"{name}:{key}"] for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(title)
        ax.legend()
    m = result["machine"]
    fig.suptitle(f"{result['model']} ({result['layers']} layers), {result['dtype']}, "
                 f"{m['device']} {m['device_name'] or m['processor']}, mlx {m['mlx']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _positive(text: str) -> int:
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _lengths(text: str) -> list[int]:
    """--prompts: comma-separated prompt lengths, each at least 1."""
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of token counts, e.g. 512,2048"
        ) from None
    if any(n < 1 for n in lengths):
        raise argparse.ArgumentTypeError(f"every prompt length must be at least 1, not {text!r}")
    return lengths


def build_parser() -> argparse.ArgumentParser:
    from .shapes import SHAPES

    ap = ArgumentParser(prog="granite-mlx bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a checkpoint folder or Hub repo (default: random weights)")
    ap.add_argument("--shape", default="h-350m", choices=list(SHAPES),
                    help="released shape for random weights")  # fmt: skip
    ap.add_argument("--layers", type=whole_number, default=0,
                    help="keep only this many layers (faster)")  # fmt: skip
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--q-bits", type=int, choices=[4, 8], default=None)
    ap.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64)
    ap.add_argument("--prompts", type=_lengths, default="512,1024,2048,4096,8192,16384,32768",
                    help="prompt lengths in tokens, comma-separated")  # fmt: skip
    ap.add_argument("--decode", type=_positive, default=64, help="tokens to decode per run")
    ap.add_argument("--repeats", type=_positive, default=3)
    ap.add_argument("--prefill-step", type=_positive, default=None,
                    help="prompt tokens per model call, for both runtimes (default: ours for "
                         "the device, 2048 on a GPU, 256 on the CPU)")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="graph size and decode breakdown")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG plot here")
    return ap


def check_args(args: argparse.Namespace) -> None:
    """What the parser cannot see, before any model is built or loaded."""
    from .shapes import SHAPES

    full = len(SHAPES[args.shape]["layer_types"])
    if not args.model and not 0 <= args.layers <= full:
        raise GraniteError(
            f"--layers must be from 1 to {full} ({args.shape} has {full} layers), or 0 for all "
            f"of them; not {args.layers}."
        )
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not Path(path).expanduser().parent.is_dir():
            raise GraniteError(
                f"{option} {path}: the folder {Path(path).expanduser().parent} does not exist; "
                "create it first (the results would be lost after the run)."
            )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    args.prefill_step = args.prefill_step or default_prefill_step_size()
    result = run(args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
