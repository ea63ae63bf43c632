"""Deterministic random Granite 4.0 checkpoints, written without torch or mlx.

What: ``write_checkpoint(folder, config, seed)`` writes ``config.json`` and
``model.safetensors`` for a ``granitemoehybrid`` model in the layout IBM's Hub
checkpoints use (weight names as in ``shared/GRANITE.md``), filled with random
weights of a healthy magnitude. ``config_for(case)`` gives the small configs
the test-suite and ``tests/make_reference.py`` use.

Why: tests need checkpoints that are too big to commit (a real 100352-token
vocabulary) or that should be made on the fly, and the reference fixtures
record only ``(config, seed)`` for those. The bytes must therefore be the same
on every machine and every future numpy, so the weights do not come from
numpy's random generators (whose streams may change between versions): each
value is a splitmix64 hash of a counter, keyed by the seed and the tensor's
name, mapped to uniform(-1, 1). Only numpy and the standard library are used;
the safetensors file is written by hand (numpy has no bfloat16), in the
standard format (8-byte little-endian header length, JSON header, raw data).

Scales: every weight matrix (and conv1d's [C, 1, K] kernel, and each expert)
uniform with std 1/sqrt(fan_in), except the projections that write into the
residual stream (``o_proj``, ``out_proj``, the ``output_linear`` ones), which
get std OUT_GAIN/sqrt(fan_in); embeddings std EMBED_STD; RMSNorm weights
1 +- 0.1; conv1d bias +-0.1; ``A_log = log(uniform(1, 16))``;
``dt_bias = softplus^-1(dt0)`` with dt0 log-uniform in [0.001, 0.1];
``D = 1 +- 0.1``. The large output gain keeps a tied random model from being
dominated by ``embedding_multiplier`` times the current token's own embedding
(it would then greedily repeat its last token forever, which makes a weak
generation test); with it, greedy output is varied and the top-1/top-2 logit
margins stay comfortably above float32 noise.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

__all__ = [
    "CASES",
    "config_for",
    "layer_kinds",
    "make_weights",
    "mamba_head_dim",
    "save_safetensors",
    "uniform",
    "write_checkpoint",
]

EMBED_STD = 0.3
OUT_GAIN = 24.0
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# --------------------------------------------------------------------------
# Counter-based random numbers
# --------------------------------------------------------------------------


def _key(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _splitmix64(counter: np.ndarray) -> np.ndarray:
    """The splitmix64 output function applied elementwise (uint64, wrapping)."""
    z = counter.astype(np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniform(seed: int, name: str, shape) -> np.ndarray:
    """float64 array of ``shape`` with values uniform in (-1, 1), fixed forever
    by ``(seed, name)``."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    key = np.uint64(_key(seed, name))
    with np.errstate(over="ignore"):
        counter = key + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)
        bits = _splitmix64(counter) >> np.uint64(11)  # 53 random bits
    unit = (bits.astype(np.float64) + 0.5) * (2.0**-53)  # in (0, 1)
    return (2.0 * unit - 1.0).reshape(shape)


# --------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------

_MAMBA = {"mamba", "linear_attention"}
_ATTENTION = {"attention", "full_attention"}


def layer_kinds(config: dict) -> list[str]:
    """Each layer as "mamba" or "attention", whichever spelling the config uses."""
    kinds = config.get("layer_types") or config.get("layers_block_type")
    if kinds is None:  # transformers' default: all Mamba
        kinds = ["mamba"] * config["num_hidden_layers"]
    out = []
    for kind in kinds:
        if kind in _MAMBA:
            out.append("mamba")
        elif kind in _ATTENTION:
            out.append("attention")
        else:
            raise ValueError(f"unknown layer type {kind!r}")
    return out


def mamba_head_dim(config: dict) -> int:
    d_head = config.get("mamba_d_head", "auto")
    if d_head == "auto":
        return config.get("mamba_expand", 2) * config["hidden_size"] // config["mamba_n_heads"]
    return int(d_head)


def _base_config(**overrides) -> dict:
    """A Hub-spelled config (as IBM ships them) for a tiny model."""
    config = {
        "architectures": ["GraniteMoeHybridForCausalLM"],
        "model_type": "granitemoehybrid",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_multiplier": 0.125,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
        "embedding_multiplier": 12,
        "hidden_act": "silu",
        "hidden_size": 64,
        "init_method": "mup",
        "initializer_range": 0.1,
        "intermediate_size": 32,
        "layer_types": ["mamba", "attention", "mamba", "attention"],
        "logits_scaling": 3,
        "mamba_chunk_size": 16,
        "mamba_conv_bias": True,
        "mamba_d_conv": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 16,
        "mamba_expand": 2,
        "mamba_n_groups": 1,
        "mamba_n_heads": 8,
        "mamba_proj_bias": False,
        "max_position_embeddings": 4096,
        "normalization_function": "rmsnorm",
        "num_attention_heads": 4,
        "num_experts_per_tok": 0,
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 0,
        "output_router_logits": False,
        "position_embedding_type": "nope",
        "residual_multiplier": 0.25,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000,
        "router_aux_loss_coef": 0.01,
        "shared_intermediate_size": 32,
        "tie_word_embeddings": True,
        "transformers_version": "4.56.0",
        "use_cache": True,
        "vocab_size": 512,
    }
    config.update(overrides)
    config["num_hidden_layers"] = len(config.get("layer_types") or config.get("layers_block_type"))
    return config


def _hybrid_nope() -> dict:
    # H-350M-like: Mamba2 + NoPE attention, tied, attention_multiplier != 1/sqrt(d).
    return _base_config()


def _dense_rope_untied() -> dict:
    return _base_config(
        layer_types=["attention"] * 4,
        position_embedding_type="rope",
        tie_word_embeddings=False,
        attention_multiplier=0.1,
        residual_multiplier=0.22,
        logits_scaling=2,
        shared_intermediate_size=48,
    )


def _moe_hybrid() -> dict:
    return _base_config(
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=32,
        shared_intermediate_size=64,
        time_step_limit=[0.0, math.inf],  # json writes the bare token Infinity
    )


def _groups2() -> dict:
    config = _base_config(mamba_n_groups=2)
    config["layers_block_type"] = ["mamba", "mamba", "attention", "mamba"]  # older key
    del config["layer_types"]
    config["num_hidden_layers"] = 4
    return config


def _dt_limit() -> dict:
    return _base_config(
        mamba_n_heads=4,
        mamba_d_head="auto",  # 2 * 64 / 4 = 32
        time_step_limit=[0.0, 0.05],
    )


def _real_vocab() -> dict:
    # Real Granite vocabulary and special tokens, for tests with the real tokenizer.
    return _base_config(
        vocab_size=100352,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=16,
        shared_intermediate_size=64,
        bos_token_id=100257,
        eos_token_id=100257,
        pad_token_id=100256,
        attention_multiplier=0.25,
        residual_multiplier=0.25,
        logits_scaling=1,  # wider logits: with 100352 candidates top-1/top-2 margins get small
    )


CASES = {
    "hybrid_nope": _hybrid_nope,
    "dense_rope_untied": _dense_rope_untied,
    "moe_hybrid": _moe_hybrid,
    "groups2": _groups2,
    "dt_limit": _dt_limit,
    "real_vocab": _real_vocab,
}


def config_for(case: str) -> dict:
    """The Hub-spelled config.json contents (a fresh dict) for a named case."""
    try:
        return CASES[case]()
    except KeyError:
        raise KeyError(f"unknown case {case!r}; known: {sorted(CASES)}") from None


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------


def _scaled(seed, name, shape, std):
    return math.sqrt(3.0) * std * uniform(seed, name, shape)  # uniform(-1, 1) has std 1/sqrt(3)


def _linear(seed, name, out_features, in_features, gain=1.0):
    return _scaled(seed, name, (out_features, in_features), gain / math.sqrt(in_features))


def _norm(seed, name, size):
    return 1.0 + 0.1 * uniform(seed, name, (size,))


def _mamba_weights(seed, prefix, config) -> dict:
    hidden = config["hidden_size"]
    n_heads = config["mamba_n_heads"]
    d_inner = n_heads * mamba_head_dim(config)
    d_state = config["mamba_d_state"]
    n_groups = config.get("mamba_n_groups", 1)
    kernel = config.get("mamba_d_conv", 4)
    conv_dim = d_inner + 2 * n_groups * d_state
    p = prefix + "mamba."

    w = {
        p + "in_proj.weight": _linear(
            seed, p + "in_proj.weight", d_inner + conv_dim + n_heads, hidden
        ),
        p + "conv1d.weight": _scaled(
            seed, p + "conv1d.weight", (conv_dim, 1, kernel), 1.0 / math.sqrt(kernel)
        ),
        p + "out_proj.weight": _linear(seed, p + "out_proj.weight", hidden, d_inner, OUT_GAIN),
        p + "norm.weight": _norm(seed, p + "norm.weight", d_inner),
    }
    if config.get("mamba_conv_bias", True):
        w[p + "conv1d.bias"] = 0.1 * uniform(seed, p + "conv1d.bias", (conv_dim,))
    if config.get("mamba_proj_bias", False):
        w[p + "in_proj.bias"] = 0.1 * uniform(
            seed, p + "in_proj.bias", (d_inner + conv_dim + n_heads,)
        )
        w[p + "out_proj.bias"] = 0.1 * uniform(seed, p + "out_proj.bias", (hidden,))

    a = 0.5 * (uniform(seed, p + "A_log", (n_heads,)) + 1.0)  # (0, 1)
    w[p + "A_log"] = np.log(1.0 + 15.0 * a)  # log(uniform(1, 16))
    t = 0.5 * (uniform(seed, p + "dt_bias", (n_heads,)) + 1.0)
    dt0 = np.exp(np.log(0.001) + t * (np.log(0.1) - np.log(0.001)))
    w[p + "dt_bias"] = dt0 + np.log(-np.expm1(-dt0))  # inverse softplus
    w[p + "D"] = 1.0 + 0.1 * uniform(seed, p + "D", (n_heads,))
    return w


def _attention_weights(seed, prefix, config) -> dict:
    hidden = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    head_dim = hidden // n_heads
    p = prefix + "self_attn."
    w = {
        p + "q_proj.weight": _linear(seed, p + "q_proj.weight", n_heads * head_dim, hidden),
        p + "k_proj.weight": _linear(seed, p + "k_proj.weight", n_kv * head_dim, hidden),
        p + "v_proj.weight": _linear(seed, p + "v_proj.weight", n_kv * head_dim, hidden),
        p + "o_proj.weight": _linear(
            seed, p + "o_proj.weight", hidden, n_heads * head_dim, OUT_GAIN
        ),
    }
    if config.get("attention_bias", False):
        for proj, size in (("q", n_heads), ("k", n_kv), ("v", n_kv), ("o", None)):
            n = hidden if size is None else size * head_dim
            w[p + f"{proj}_proj.bias"] = 0.1 * uniform(seed, p + f"{proj}_proj.bias", (n,))
    return w


def _mlp_weights(seed, prefix, config) -> dict:
    hidden = config["hidden_size"]
    shared = config["shared_intermediate_size"]
    p = prefix + "shared_mlp."
    w = {
        p + "input_linear.weight": _linear(seed, p + "input_linear.weight", 2 * shared, hidden),
        p + "output_linear.weight": _linear(
            seed, p + "output_linear.weight", hidden, shared, OUT_GAIN
        ),
    }
    n_experts = config.get("num_local_experts") or 0
    if n_experts > 0:
        inter = config["intermediate_size"]
        q = prefix + "block_sparse_moe."
        w[q + "input_linear.weight"] = _scaled(
            seed, q + "input_linear.weight", (n_experts, 2 * inter, hidden), 1.0 / math.sqrt(hidden)
        )
        w[q + "output_linear.weight"] = _scaled(
            seed,
            q + "output_linear.weight",
            (n_experts, hidden, inter),
            OUT_GAIN / math.sqrt(inter),
        )
        w[q + "router.layer.weight"] = _linear(seed, q + "router.layer.weight", n_experts, hidden)
    return w


def make_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """All weights (float32 numpy arrays, Hub names) for ``config``; tied models
    get no ``lm_head.weight``."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    w = {
        "model.embed_tokens.weight": _scaled(
            seed, "model.embed_tokens.weight", (vocab, hidden), EMBED_STD
        ),
        "model.norm.weight": _norm(seed, "model.norm.weight", hidden),
    }
    for i, kind in enumerate(layer_kinds(config)):
        prefix = f"model.layers.{i}."
        w[prefix + "input_layernorm.weight"] = _norm(
            seed, prefix + "input_layernorm.weight", hidden
        )
        w[prefix + "post_attention_layernorm.weight"] = _norm(
            seed, prefix + "post_attention_layernorm.weight", hidden
        )
        mixer = _mamba_weights if kind == "mamba" else _attention_weights
        w.update(mixer(seed, prefix, config))
        w.update(_mlp_weights(seed, prefix, config))
    if not config.get("tie_word_embeddings", True):
        w["lm_head.weight"] = _linear(seed, "lm_head.weight", vocab, hidden)
    return {name: value.astype(np.float32) for name, value in w.items()}


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype="<f4").tobytes()
    if dtype == "float16":
        return np.ascontiguousarray(x, dtype="<f2").tobytes()
    return _to_bfloat16_bits(x).astype("<u2").tobytes()


def save_safetensors(path, tensors: dict[str, np.ndarray], dtype: str = "float32") -> None:
    """Write ``tensors`` (float arrays) to a .safetensors file in ``dtype``
    (float32, float16 or bfloat16)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        blob = _encode(tensors[name], dtype)
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def write_checkpoint(
    folder, config: dict, seed: int, dtype: str = "float32", extra_lm_head: bool = False
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (Hub layout) to ``folder``.

    ``config`` is written as given (any spelling), except that ``torch_dtype``
    is set to ``dtype`` unless the config already names a dtype (``torch_dtype``
    or transformers-5 ``dtype``). ``extra_lm_head`` adds a redundant
    ``lm_head.weight`` (a copy of the embeddings) to a tied model, as some Hub
    checkpoints do. Returns the folder as a Path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    if "torch_dtype" not in config and "dtype" not in config:
        config["torch_dtype"] = dtype
    weights = make_weights(config, seed)
    if extra_lm_head and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_safetensors(folder / "model.safetensors", weights, dtype)
    return folder
