"""Which Granite tensors can take 4 bits? Measure it, class by class.

For each model (random-weight real shapes, and the tiny test fixtures), against bf16:
- each tensor class quantized to 4 bits ALONE (everything else bf16): the KL
  divergence / top-1 agreement against bf16, and the bytes that saves;
- uniform 4-bit with that one class at 8 bits instead ("upgrade"): how much of
  the uniform-4-bit loss that class is responsible for, and what the 8 bits cost;
- the whole recipes (uniform, granite, mixed at 4 bits; uniform 8 bits).

    python benchmarks/recipe_study.py                       # all models (slow on a CPU)
    python benchmarks/recipe_study.py --models fixtures     # the tiny fixtures only
    python benchmarks/recipe_study.py --json study.json

Weights are rounded to bf16 but held and computed in float32: that isolates
the quantization error from bf16 activation rounding, and MLX's CPU kernels
(gather_qmm above all) are several times slower in bf16 on x86.

Random weights are a weak proxy for trained ones (no outlier channels, no
learned structure): read the numbers as "how much does this class's error
reach the logits", not as the quality of a real conversion.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import mlx.core as mx
from granite_mlx.convert.quality import QualityInputs, compare, log_probs
from granite_mlx.convert.recipe import (
    TENSOR_CLASSES,
    apply_plan,
    plan_quantization,
    recipe_bits,
    tensor_class,
)
from mlx.utils import tree_flatten

from granite_mlx.config import ModelArgs
from granite_mlx.loading import load_model
from granite_mlx.model import Model
from granite_mlx.shapes import SHAPES, random_model
from granite_mlx.weights import FLOAT32_PARAMS

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "checkpoints"
GROUP_SIZE = 64


def _bf16_valued(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Weights rounded to bf16, held in float32 (see the module docstring)."""
    return {k: v.astype(mx.bfloat16).astype(mx.float32) for k, v in weights.items()}


def _flat(model: Model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def _with_residual_gain(weights: dict[str, mx.array], gain: float) -> dict[str, mx.array]:
    """Scale the projections that write into the residual stream by `gain`.

    With `shapes.random_weights` alone, 12 x the token's own embedding dominates
    the residual stream, so the logits mostly echo the input token. A gain (as
    tests/checkpoint_factory.py uses) makes the layers matter: a second proxy.
    """
    writes = ("o_proj.weight", "out_proj.weight", "output_linear.weight")
    return {k: v * gain if k.endswith(writes) else v for k, v in weights.items()}


def _models(names: list[str], tokens: int | None):
    """(name, weights, args, sequences) for each model asked for.

    Names: fixtures, h-tiny-4l, any shape of granite_mlx.shapes (h-350m, 350m,
    ...), each optionally with a residual gain suffix such as h-350m-g24.
    """
    for name in names:
        if name == "fixtures":
            for case in ("hybrid_nope", "moe_hybrid", "dense_rope_untied"):
                m = load_model(FIXTURES / case / "hub")
                seqs = _random_tokens(m.args.vocab_size, 4, 64)
                yield f"fixture {case}", _bf16_valued(_flat(m)), m.args, seqs
            continue
        shape, _, gain = name.partition("-g")
        if shape == "h-tiny-4l":
            # H-Tiny's widths and 64 experts (top 6), cut to 4 layers to fit a CPU run.
            layers = ["mamba", "attention", "mamba", "mamba"]
            m = random_model("h-tiny", dtype=mx.bfloat16, num_hidden_layers=4, layer_types=layers)
            n = tokens or 64
        elif shape in SHAPES:
            m, n = random_model(shape, dtype=mx.bfloat16), tokens or 128
        else:
            raise SystemExit(
                f"unknown model {name!r}: fixtures, h-tiny-4l or one of {', '.join(SHAPES)} "
                "(optionally with -gGAIN)"
            )
        weights = _flat(m)
        if gain:
            weights = _with_residual_gain(weights, float(gain))
        weights = _bf16_valued(weights)
        yield name, weights, m.args, _random_tokens(m.args.vocab_size, 1, n)


def _random_tokens(vocab: int, n: int, length: int) -> list[mx.array]:
    t = mx.random.randint(0, vocab, (n, length), key=mx.random.key(1234))
    return [t[i] for i in range(n)]


def _fresh(weights: dict, args: ModelArgs) -> Model:
    model = Model(args)  # lazy zeros, replaced before they are ever computed
    model.load_weights(list(weights.items()))
    model.eval()
    return model


def _stored_bytes(name: str, v: mx.array) -> int:
    """Bytes in a bf16 checkpoint: floats at 2 bytes (the SSM's A_log, D, dt_bias
    at 4, as the converter stores them), packed quantized weights as they are."""
    if not mx.issubdtype(v.dtype, mx.floating):
        return v.nbytes
    return v.size * (4 if name.rsplit(".", 1)[-1] in FLOAT32_PARAMS else 2)


def _class_bytes(model: Model) -> dict[str, int]:
    """Bytes held by each tensor class's modules (all their arrays)."""
    out: dict[str, int] = {}
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized") or "Quantized" in type(module).__name__:
            size = sum(_stored_bytes(k, v) for k, v in tree_flatten(module.parameters()))
            out[tensor_class(path)] = out.get(tensor_class(path), 0) + size
    return out


def _total_bytes(model: Model) -> int:
    return sum(_stored_bytes(k, v) for k, v in tree_flatten(model.parameters()))


def _run(weights, args, inputs, reference, class_bits) -> tuple[dict, Model]:
    model = _fresh(weights, args)
    apply_plan(model, plan_quantization(model, class_bits, GROUP_SIZE))
    mx.eval(model.parameters())
    rep = compare(reference, log_probs(model, inputs.sequences, progress=False), inputs)
    return {
        "mean_kl": rep.mean_kl,
        "max_kl": rep.max_kl,
        "top1": rep.top1_agreement,
        "ppl_ratio": rep.ppl_ratio,
        "bytes": _total_bytes(model),
    }, model


def study(name, weights, args, sequences, classes: bool = True) -> dict:
    t0 = time.perf_counter()
    inputs = QualityInputs(sequences, "random tokens", "")
    base = _fresh(weights, args)
    reference = log_probs(base, sequences, progress=False)
    bf16_bytes = _total_bytes(base)
    bf16_class = _class_bytes(base)
    present = [c for c in TENSOR_CLASSES if c in bf16_class] if classes else []
    del base
    result = {
        "model": name,
        "bf16_bytes": bf16_bytes,
        "tokens": sum(s.size for s in sequences),
        "classes": {},
        "recipes": {},
    }
    for cls in present:
        alone, model = _run(weights, args, inputs, reference, {cls: 4})
        q4_bytes = _class_bytes(model)[cls]
        upgrade, model = _run(
            weights, args, inputs, reference, {**recipe_bits("uniform", 4, args), cls: 8}
        )
        q8_bytes = _class_bytes(model)[cls]
        result["classes"][cls] = {
            "bf16_bytes": bf16_class[cls],
            "q4_bytes": q4_bytes,
            "q8_bytes": q8_bytes,
            "alone_4bit": alone,
            "uniform4_with_this_at_8bit": upgrade,
        }
        print(
            f"  {name} {cls}: alone KL {alone['mean_kl']:.5f}, upgrade KL {upgrade['mean_kl']:.5f}",
            flush=True,
        )
    for label, recipe, bits in [
        ("uniform 4", "uniform", 4),
        ("granite 4", "granite", 4),
        ("mixed 4", "mixed", 4),
        ("uniform 8", "uniform", 8),
    ]:
        result["recipes"][label], _ = _run(
            weights, args, inputs, reference, recipe_bits(recipe, bits, args)
        )
    result["seconds"] = time.perf_counter() - t0
    return result


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f}" if n >= 1e8 else f"{n / 1e6:.3g}"


def report(r: dict) -> str:
    total = r["bf16_bytes"]
    u4 = r["recipes"]["uniform 4"]
    lines = [f"### {r['model']} (bf16 {_mb(total)} MB, {r['tokens']} random tokens)", ""]
    if r["classes"]:
        lines += [
            (
                "| class | share of bf16 bytes | 4-bit alone: mean KL | uniform 4-bit but this class "
                "8-bit: mean KL | KL removed | size added |"
            ),
            "|---|---:|---:|---:|---:|---:|",
        ]
    for cls, c in r["classes"].items():
        a, up = c["alone_4bit"], c["uniform4_with_this_at_8bit"]
        removed = 1 - up["mean_kl"] / u4["mean_kl"] if u4["mean_kl"] > 0 else 0.0
        added = (c["q8_bytes"] - c["q4_bytes"]) / u4["bytes"]
        lines.append(
            f"| {cls} | {c['bf16_bytes'] / total:.1%} | {a['mean_kl']:.5f} | "
            f"{up['mean_kl']:.5f} | {removed:.0%} | {added:+.1%} |"
        )
    lines += [
        "",
        "| recipe | MB | vs bf16 | mean KL | max KL | top-1 | ppl ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, x in r["recipes"].items():
        lines.append(
            f"| {label} | {_mb(x['bytes'])} | {x['bytes'] / total:.1%} | {x['mean_kl']:.5f} | "
            f"{x['max_kl']:.5f} | {x['top1']:.1%} | {x['ppl_ratio']:.4f} |"
        )
    return "\n".join(lines)


def merged(paths: list[Path]) -> list[dict]:
    """Results from several --json files; later recipe rows replace earlier ones."""
    by_model: dict[str, dict] = {}
    for path in paths:
        for r in json.loads(path.read_text()):
            if r["model"] in by_model:
                by_model[r["model"]]["recipes"].update(r["recipes"])
                by_model[r["model"]]["classes"].update(r["classes"])
            else:
                by_model[r["model"]] = r
    return list(by_model.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models",
        default="fixtures,h-tiny-4l,h-350m",
        help="comma-separated: fixtures, h-tiny-4l, h-350m, h-350m-g24 (see _models)",
    )
    ap.add_argument(
        "--tokens", type=int, help="random tokens for the real shapes (h-350m 128, h-tiny-4l 64)"
    )
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    ap.add_argument(
        "--recipes-only", action="store_true", help="measure the whole recipes, not each class"
    )
    ap.add_argument(
        "--report",
        type=Path,
        nargs="+",
        help="print the tables of saved --json files, measure nothing",
    )
    a = ap.parse_args()
    if a.report:
        print("\n\n".join(report(r) for r in merged(a.report)))
        return
    print(
        f"# recipe study: {platform.machine()}, mlx {mx.__version__}, {mx.default_device()}, "
        f"group size {GROUP_SIZE}\n",
        flush=True,
    )
    results = []
    for name, weights, args, seqs in _models(a.models.split(","), a.tokens):
        results.append(study(name, weights, args, seqs, classes=not a.recipes_only))
        print(report(results[-1]) + "\n", flush=True)
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
