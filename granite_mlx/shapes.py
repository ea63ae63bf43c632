"""The released Granite 4.0 shapes, and random-weight models of them.

For speed work and tests where no real weights can be had: the configs follow
the table in GRANITE.md; the weights are random but of healthy scale, so a
forward pass does the same arithmetic as the real model.
"""

from __future__ import annotations

import math

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelArgs
from .model import Model

_COMMON = dict(
    model_type="granitemoehybrid", vocab_size=100352, rms_norm_eps=1e-5, embedding_multiplier=12.0,
    tie_word_embeddings=True, mamba_expand=2, mamba_n_groups=1, mamba_d_conv=4,
    mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=False,
    bos_token_id=100257, eos_token_id=100257, pad_token_id=100256,
)  # fmt: skip


def _hybrid(n_layers: int, attention_at: tuple[int, ...]) -> list[str]:
    return ["attention" if i in attention_at else "mamba" for i in range(n_layers)]


SHAPES: dict[str, dict] = {
    "h-350m": dict(
        hidden_size=768, num_hidden_layers=32, layer_types=_hybrid(32, (10, 13, 17, 27)),
        num_attention_heads=12, num_key_value_heads=4, mamba_n_heads=48, mamba_d_head=32,
        mamba_d_state=128, shared_intermediate_size=2048, intermediate_size=2048,
        attention_multiplier=0.015625, residual_multiplier=0.246, logits_scaling=3.0,
        max_position_embeddings=32768, position_embedding_type="nope",
    ),
    "h-1b": dict(
        hidden_size=1536, num_hidden_layers=40, layer_types=_hybrid(40, (5, 15, 25, 35)),
        num_attention_heads=12, num_key_value_heads=4, mamba_n_heads=48, mamba_d_head=64,
        mamba_d_state=128, shared_intermediate_size=4096, intermediate_size=4096,
        attention_multiplier=0.0078125, residual_multiplier=0.22, logits_scaling=6.0,
        max_position_embeddings=131072, position_embedding_type="nope",
    ),
    "350m": dict(
        hidden_size=1024, num_hidden_layers=28, layer_types=["attention"] * 28,
        num_attention_heads=16, num_key_value_heads=4, shared_intermediate_size=2048,
        intermediate_size=2048, attention_multiplier=0.015625, residual_multiplier=0.263,
        logits_scaling=4.0, max_position_embeddings=32768, position_embedding_type="rope",
        rope_theta=1e7,
    ),
    "1b": dict(
        hidden_size=2048, num_hidden_layers=40, layer_types=["attention"] * 40,
        num_attention_heads=16, num_key_value_heads=4, shared_intermediate_size=4096,
        intermediate_size=4096, attention_multiplier=0.0078125, residual_multiplier=0.22,
        logits_scaling=8.0, max_position_embeddings=131072, position_embedding_type="rope",
        rope_theta=1e7,
    ),
    "micro": dict(
        hidden_size=2560, num_hidden_layers=40, layer_types=["attention"] * 40,
        num_attention_heads=40, num_key_value_heads=8, shared_intermediate_size=8192,
        intermediate_size=8192, attention_multiplier=0.015625, residual_multiplier=0.22,
        logits_scaling=10.0, max_position_embeddings=131072, position_embedding_type="rope",
        rope_theta=1e7,
    ),
    "h-micro": dict(
        # residual_multiplier is unconfirmed for this model (GRANITE.md): 0.22 as its siblings.
        hidden_size=2048, num_hidden_layers=40, layer_types=_hybrid(40, (5, 15, 25, 35)),
        num_attention_heads=32, num_key_value_heads=8, mamba_n_heads=64, mamba_d_head=64,
        mamba_d_state=128, shared_intermediate_size=8192, intermediate_size=8192,
        attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=8.0,
        max_position_embeddings=131072, position_embedding_type="nope",
    ),
    "h-tiny": dict(
        hidden_size=1536, num_hidden_layers=40, layer_types=_hybrid(40, (5, 15, 25, 35)),
        num_attention_heads=12, num_key_value_heads=4, mamba_n_heads=48, mamba_d_head=64,
        mamba_d_state=128, shared_intermediate_size=1024, intermediate_size=512,
        num_local_experts=64, num_experts_per_tok=6, attention_multiplier=0.0078125,
        residual_multiplier=0.22, logits_scaling=6.0, max_position_embeddings=131072,
        position_embedding_type="nope",
    ),
    "h-small": dict(
        # 36 Mamba2 + 4 attention layers; the attention positions are not published.
        hidden_size=4096, num_hidden_layers=40, layer_types=_hybrid(40, (5, 15, 25, 35)),
        num_attention_heads=32, num_key_value_heads=8, mamba_n_heads=128, mamba_d_head="auto",
        mamba_d_state=128, shared_intermediate_size=1536, intermediate_size=768,
        num_local_experts=72, num_experts_per_tok=10, attention_multiplier=0.0078125,
        residual_multiplier=0.22, logits_scaling=16.0, max_position_embeddings=131072,
        position_embedding_type="nope",
    ),
}  # fmt: skip


def shape_config(name: str, **overrides) -> dict:
    """config.json (as a dict) of a released shape, e.g. "h-350m"."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return {**_COMMON, **SHAPES[name], **overrides}


def random_weights(model: Model, seed: int = 0) -> None:
    """Fill `model` with random weights of healthy scale (in place)."""
    params = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        k = mx.random.key(seed * 100003 + i)
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * mx.random.normal(p.shape, key=k)
        elif leaf == "A_log":
            w = mx.log(mx.random.uniform(1.0, 16.0, p.shape, key=k))
        elif leaf == "dt_bias":
            dt = mx.exp(mx.random.uniform(math.log(1e-3), math.log(1e-1), p.shape, key=k))
            w = dt + mx.log(-mx.expm1(-dt))  # inverse softplus
        elif leaf == "D":
            w = mx.ones(p.shape)
        elif leaf == "bias":
            w = mx.zeros(p.shape)
        else:
            fan_in = p.shape[-1]
            w = mx.random.normal(p.shape, key=k) * (fan_in**-0.5)
        params.append((name, w.astype(mx.float32 if leaf in ("A_log", "D", "dt_bias") else p.dtype)))
    model.update(tree_unflatten(params))


def random_model(name: str, dtype: mx.Dtype = mx.bfloat16, seed: int = 0, **overrides) -> Model:
    """A model of a released shape with random weights, in `dtype`."""
    model = Model(ModelArgs.from_dict(shape_config(name, **overrides)))
    model.set_dtype(dtype)
    random_weights(model, seed)
    mx.eval(model.parameters())
    return model


def count_parameters(model: Model) -> int:
    return sum(p.size for _, p in tree_flatten(model.parameters()))
