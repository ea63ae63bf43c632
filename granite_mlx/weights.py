"""Weight layouts: every rename and reshape between checkpoints and our modules.

Three layouts are met:
- the Hub's (IBM's checkpoints, and our module names): `shared_mlp.input_linear`,
  `block_sparse_moe.{input_linear,output_linear,router.layer}`, conv1d (C, 1, K);
- transformers 5's in-memory names, should a checkpoint be saved with them:
  `block_sparse_moe.experts.{gate_up_proj,down_proj}`, `block_sparse_moe.router.weight`;
- mlx-lm's (mlx-community conversions): conv1d (C, K, 1), the dense MLP split as
  `mlp.{gate,up,down}_proj`, experts as `block_sparse_moe.switch_mlp.*`.

`sanitize` brings any of them to ours; `to_mlx_lm_layout` goes the other way so
that our converter's output loads in mlx-lm too. Quantized tensors (`.scales`,
`.biases`) follow their weight: packing is along the input axis, so splitting
or joining along the output axis is exact.
"""

from __future__ import annotations

import re

import mlx.core as mx

from .config import ModelArgs

_SUFFIXES = ("weight", "scales", "biases")
_MLX_LM_MLP = re.compile(r"^(model\.layers\.\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(\w+)$")
_MLX_LM_SWITCH = re.compile(
    r"^(model\.layers\.\d+)\.block_sparse_moe\.switch_mlp\.(gate_proj|up_proj|down_proj)\.(\w+)$"
)
_RENAMES = [
    (re.compile(r"\.block_sparse_moe\.experts\.gate_up_proj$"), ".block_sparse_moe.input_linear.weight"),
    (re.compile(r"\.block_sparse_moe\.experts\.down_proj$"), ".block_sparse_moe.output_linear.weight"),
    (re.compile(r"\.block_sparse_moe\.router\.weight$"), ".block_sparse_moe.router.layer.weight"),
]
FLOAT32_PARAMS = ("A_log", "D", "dt_bias")  # enter exp() and the state: never low precision


def sanitize(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """Any known layout -> our module names and shapes."""
    out: dict[str, mx.array] = {}
    halves: dict[tuple[str, str, str], dict[str, tuple[str, mx.array]]] = {}
    for name, w in weights.items():
        for pattern, repl in _RENAMES:
            name = pattern.sub(repl, name)
        if args.tie_word_embeddings and name == "lm_head.weight":
            continue  # a redundant copy of the tied embedding some checkpoints ship
        if name.endswith("conv1d.weight") and w.ndim == 3:
            w = w.squeeze(1) if w.shape[1] == 1 else w.squeeze(2)  # (C,1,K) or (C,K,1) -> (C,K)
        m = _MLX_LM_MLP.match(name) or _MLX_LM_SWITCH.match(name)
        if m:
            layer, proj, suffix = m.groups()
            block = "shared_mlp" if m.re is _MLX_LM_MLP else "block_sparse_moe"
            if proj == "down_proj":
                out[f"{layer}.{block}.output_linear.{suffix}"] = w
            else:
                halves.setdefault((layer, block, suffix), {})[proj] = (name, w)
            continue
        out[name] = w
    for (layer, block, suffix), parts in halves.items():
        if set(parts) != {"gate_proj", "up_proj"}:
            out.update(parts.values())  # unpaired: left under its own name, reported as unexpected
            continue
        axis = 0 if block == "shared_mlp" else 1  # experts are (E, out, in)
        out[f"{layer}.{block}.input_linear.{suffix}"] = mx.concatenate(
            [parts["gate_proj"][1], parts["up_proj"][1]], axis=axis
        )
    return out


def to_mlx_lm_layout(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """Our names -> mlx-lm's, so `mlx_lm.load` reads what we write."""
    out: dict[str, mx.array] = {}
    for name, w in weights.items():
        if name.endswith("conv1d.weight") and w.ndim == 2:
            out[name] = w[:, :, None]  # (C,K) -> (C,K,1)
            continue
        module, _, suffix = name.rpartition(".")
        targets = mlx_lm_module_paths(module, args)
        # input_linear holds mlx-lm's gate and up stacked on the output axis, which
        # is axis -2 for plain (out, in) and expert (E, out, in) tensors alike.
        parts = mx.split(w, 2, axis=-2) if len(targets) == 2 else [w]
        for target, part in zip(targets, parts):
            out[f"{target}.{suffix}"] = part
    return out


_OUR_MLP = re.compile(
    r"^(model\.layers\.\d+)\.(shared_mlp|block_sparse_moe)\.(input_linear|output_linear)$"
)


def mlx_lm_module_paths(path: str, args: ModelArgs) -> list[str]:
    """The mlx-lm module path(s) that hold what our module `path` holds."""
    m = _OUR_MLP.match(path)
    if m is None or (m.group(2) == "shared_mlp" and args.use_moe):
        return [path]  # mlx-lm keeps shared_mlp's names when the model has experts
    layer, block, which = m.groups()
    prefix = f"{layer}.mlp" if block == "shared_mlp" else f"{layer}.block_sparse_moe.switch_mlp"
    if which == "output_linear":
        return [f"{prefix}.down_proj"]
    return [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
