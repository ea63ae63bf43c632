"""Quantization recipes: which tensors get how many bits.

Every module that can be quantized (it has `to_quantized`: the Linears, the
embedding, the stacked experts) belongs to one *tensor class*; a recipe gives
each class a bit width, or None to keep it in the model dtype. The small
tensors (A_log, D, dt_bias, conv1d, the norms) belong to no class: they are
never quantized.

The Granite recipe's choices come from `benchmarks/recipe_study.py`; the
measurements and the reasoning are in convert/RECIPE.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from mlx import nn

from granite_mlx.config import ModelArgs
from granite_mlx.model import Model
from granite_mlx.weights import mlx_lm_module_paths

HIGH_BITS = 8  # what "higher precision" means in a recipe
GROUP_SIZES = (32, 64, 128)
BITS = (4, 8)

# Our module path -> tensor class. First match wins.
_CLASS_PATTERNS = [
    (re.compile(r"^model\.embed_tokens$"), "embedding"),
    (re.compile(r"^lm_head$"), "lm_head"),
    (re.compile(r"\.block_sparse_moe\.router\.layer$"), "router"),
    (re.compile(r"\.block_sparse_moe\.(input|output)_linear$"), "experts"),
    (re.compile(r"\.shared_mlp\.(input|output)_linear$"), "mlp"),
    (re.compile(r"\.mamba\.in_proj$"), "mamba_in_proj"),
    (re.compile(r"\.mamba\.out_proj$"), "mamba_out_proj"),
    (re.compile(r"\.self_attn\.[qkvo]_proj$"), "attention"),
]
TENSOR_CLASSES = [name for _, name in _CLASS_PATTERNS]

ClassBits = dict[str, "int | None"]  # tensor class -> bits, None = keep unquantized


def tensor_class(path: str) -> str:
    """The tensor class of a quantizable module (our module path)."""
    for pattern, name in _CLASS_PATTERNS:
        if pattern.search(path):
            return name
    return "other"


def _uniform(bits: int, args: ModelArgs) -> ClassBits:
    return {name: bits for name in [*TENSOR_CLASSES, "other"]}


def _granite(bits: int, args: ModelArgs) -> ClassBits:
    # RECIPE.md: per byte spent, the sequence mixer's projections remove the most
    # 4-bit error: Mamba2 in/out in the hybrids, attention in the all-attention
    # models (in the hybrids' few NoPE attention layers it hardly matters). In MoE
    # models the shared MLP (2% of the bytes there) pays too; the router is almost
    # free. The bulk (dense MLP or experts) and the embedding stay at `bits`.
    mixer = ["mamba_in_proj", "mamba_out_proj"] if args.has_mamba else ["attention"]
    upgraded = ["router", *mixer] + (["mlp"] if args.use_moe else [])
    return {**_uniform(bits, args), **dict.fromkeys(upgraded, max(bits, HIGH_BITS))}


def _mixed(bits: int, args: ModelArgs) -> ClassBits:
    # The Granite recipe plus the (tied) embedding / output head and all mixer
    # projections: only the dense MLP or the experts, most of the bytes, stay at `bits`.
    upgraded = ["embedding", "lm_head", "attention", "mamba_in_proj", "mamba_out_proj"]
    return {**_granite(bits, args), **dict.fromkeys(upgraded, max(bits, HIGH_BITS))}


RECIPES: dict[str, Callable[[int, ModelArgs], ClassBits]] = {
    "granite": _granite,
    "uniform": _uniform,
    "mixed": _mixed,
}


def recipe_bits(recipe: str, bits: int, args: ModelArgs) -> ClassBits:
    """Bits per tensor class for `recipe` at base width `bits`, for the model `args` describes."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[recipe](bits, args)


def _input_dims(module: nn.Module) -> int:
    return module.weight.shape[-1]


def _group_size_for(in_dims: int, wanted: int) -> int | None:
    """`wanted` when it divides the input width, else the largest smaller one that does."""
    for g in sorted(GROUP_SIZES, reverse=True):
        if g <= wanted and in_dims % g == 0:
            return g
    return None


Plan = dict[str, "dict[str, Any] | bool"]  # our module path -> params, or False to keep


def plan_quantization(model: Model, class_bits: ClassBits, group_size: int) -> Plan:
    """Per quantizable module of `model`: its quantization params, or False.

    A module whose input width no group size divides stays unquantized (a
    handful of tiny test models; every released shape divides by 128).
    """
    plan: Plan = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized") or not hasattr(module, "weight"):
            continue
        bits = class_bits.get(tensor_class(path))
        g = _group_size_for(_input_dims(module), group_size) if bits else None
        plan[path] = {"group_size": g, "bits": bits, "mode": "affine"} if g else False
    return plan


def apply_plan(model: Model, plan: Plan) -> None:
    """Quantize `model` in place as `plan` says."""
    nn.quantize(model, class_predicate=lambda path, _: plan.get(path, False))


def quantization_block(plan: Plan, args: ModelArgs, bits: int, group_size: int) -> dict[str, Any]:
    """config.json's `quantization` block, in the format mlx-lm reads.

    The defaults, then one entry per module that differs from them, keyed by
    mlx-lm's module paths: its own params, or False for a module kept unquantized.
    Our loader accepts the same keys.
    """
    default = {"group_size": group_size, "bits": bits, "mode": "affine"}
    overrides: dict[str, Any] = {}
    for path, params in plan.items():
        if params != default:
            overrides.update(dict.fromkeys(mlx_lm_module_paths(path, args), params))
    return {**default, **dict(sorted(overrides.items(), key=lambda kv: _natural(kv[0])))}


def _natural(path: str) -> list:
    """Sort key putting model.layers.2 before model.layers.10."""
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def summarize_plan(plan: Plan) -> dict[str, str]:
    """Tensor class -> what the plan does with it ("4-bit g64", "kept", or a mix)."""
    seen: dict[str, set[str]] = {}
    for path, params in plan.items():
        what = f"{params['bits']}-bit g{params['group_size']}" if params else "kept"
        seen.setdefault(tensor_class(path), set()).add(what)
    order = [*TENSOR_CLASSES, "other"]
    return {name: ", ".join(sorted(seen[name])) for name in order if name in seen}


def describe_plan(plan: Plan, bits: int, group_size: int, recipe: str) -> str:
    """One line for the card and quality.json, true to what `plan` did: e.g. "4-bit,
    group size 64, granite recipe", or, where the asked group size does not divide
    some tensors' width, "4-bit, group size 64 (32 for tensors 64 does not divide),
    granite recipe"."""
    used = sorted({p["group_size"] for p in plan.values() if p})
    if used in ([], [group_size]):
        groups = f"group size {group_size}"
    else:
        other = ", ".join(str(g) for g in used if g != group_size) or "none"
        if group_size in used:
            groups = f"group size {group_size} ({other} for tensors {group_size} does not divide)"
        else:
            groups = f"group size {other} ({group_size} divides no tensor's width)"
    return f"{bits}-bit, {groups}, {recipe} recipe"
