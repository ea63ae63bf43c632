"""`ModelArgs`: a Granite 4.0 config.json, every spelling met in the wild, checked.

Field names are the Hugging Face config keys. `from_dict` ignores keys it does
not know, checks the JSON type of every key it does know against the field's
annotation (before any normalising, so `"tie_word_embeddings": "false"` or
`"hidden_size": 32.0` is refused, never coerced), normalises the spellings
listed in GRANITE.md (layer kinds, RoPE parameters, `mamba_d_head: "auto"`,
`time_step_limit` with `Infinity` or a `{"__float__": "Infinity"}` object), and
`validate` refuses sizes that do not fit together, naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

MODEL_TYPE = "granitemoehybrid"

# MLX array dimensions are 32-bit: a size past this cannot be built.
MAX_DIM = 2**31 - 1

# Every way a layer kind is spelled, mapped to ours.
_LAYER_KIND = {
    "mamba": "mamba",
    "linear_attention": "mamba",  # transformers 5 save_pretrained
    "attention": "attention",
    "full_attention": "attention",
}


@dataclass
class ModelArgs:
    model_type: str = MODEL_TYPE
    vocab_size: int = 100352
    hidden_size: int = 768
    num_hidden_layers: int = 32
    num_attention_heads: int = 12
    num_key_value_heads: int = 4
    layer_types: list[str] = field(default_factory=list)  # "mamba" | "attention", one per layer
    # MLPs: the dense/shared MLP and, when num_local_experts > 0, the experts.
    intermediate_size: int = 2048  # per expert
    shared_intermediate_size: int = 2048
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    # muP-style multipliers.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None  # softmax scale; None -> 1/sqrt(head_dim)
    logits_scaling: float = 1.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    # Positions: "nope" (none) or "rope".
    position_embedding_type: str | None = "nope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    # Mamba2.
    mamba_n_heads: int = 128
    mamba_d_head: int | str = "auto"
    mamba_d_state: int = 256
    mamba_n_groups: int = 1
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # Tokens (used by generation; kept so a saved config round-trips).
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a parsed config.json; unknown keys are ignored."""
        if not isinstance(config, dict):
            raise ConfigError("config.json must hold a JSON object.")
        config = dict(config)
        model_type = config.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"model_type is {_show(model_type)}, but granite-mlx runs Granite 4.0 checkpoints "
                f"(model_type {MODEL_TYPE!r}). Point it at a Granite 4.0 model folder or repo."
            )
        _check_types(config)
        config["layer_types"] = _layer_types(config)
        config.update(_rope(config))
        config["time_step_limit"] = _time_step_limit(config.get("time_step_limit"))
        if "torch_dtype" not in config and isinstance(config.get("dtype"), str):
            config["torch_dtype"] = config["dtype"]
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in config.items() if k in known})
        args.validate()
        return args

    def validate(self) -> None:
        """Refuse sizes that cannot describe one model, naming the field."""
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "shared_intermediate_size", "rms_norm_eps",
        ]  # fmt: skip
        if self.has_mamba:
            positive += [
                "mamba_n_heads", "mamba_d_state", "mamba_n_groups", "mamba_d_conv",
                "mamba_expand", "mamba_chunk_size",
            ]  # fmt: skip
        positive += ["max_position_embeddings", "logits_scaling"]
        if self.position_embedding_type == "rope":
            positive.append("rope_theta")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, found {_show(value)}.")
        self._validate_dims()
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types lists {len(self.layer_types)} layers but num_hidden_layers is "
                f"{self.num_hidden_layers}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}."
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu').")
        if self.position_embedding_type not in ("nope", "rope"):
            raise ConfigError(
                f"position_embedding_type {self.position_embedding_type!r} is not one of "
                "'nope', null or 'rope'."
            )
        if self.num_local_experts < 0:
            raise ConfigError(f"num_local_experts must be >= 0, found {self.num_local_experts}.")
        if self.use_moe:
            if not 0 < self.num_experts_per_tok <= self.num_local_experts:
                raise ConfigError(
                    f"num_experts_per_tok {self.num_experts_per_tok} must be between 1 and "
                    f"num_local_experts {self.num_local_experts}."
                )
            if self.intermediate_size <= 0:
                raise ConfigError("intermediate_size must be positive when experts are used.")
        if self.has_mamba:
            self._validate_mamba()
        if self.rope_scaling is not None:
            factor = self.rope_scaling.get("factor", 1.0)
            if not _is_number(factor) or not math.isfinite(factor) or factor <= 0:
                raise ConfigError(
                    f"rope_scaling factor must be a positive number, found {_show(factor)}."
                )
        lo, hi = self.time_step_limit
        if not 0.0 <= lo <= hi:
            raise ConfigError(f"time_step_limit {list(self.time_step_limit)} must be 0 <= min <= max.")

    def _validate_dims(self) -> None:
        """Every dimension a weight will have fits MLX's 32-bit shapes."""
        dims = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_local_experts": self.num_local_experts,
            "2 * shared_intermediate_size": 2 * self.shared_intermediate_size,
            "2 * intermediate_size": 2 * self.intermediate_size,
            "num_key_value_heads * head_dim": self.num_key_value_heads * self.head_dim,
        }
        if self.has_mamba:
            d_inner = self.mamba_expand * self.hidden_size
            conv_dim = d_inner + 2 * self.mamba_n_groups * self.mamba_d_state
            dims["mamba in_proj width"] = d_inner + conv_dim + self.mamba_n_heads
        for what, value in dims.items():
            if value > MAX_DIM:
                raise ConfigError(
                    f"{what} is {value}, larger than any array dimension MLX can hold "
                    f"({MAX_DIM}); check config.json."
                )

    def _validate_mamba(self) -> None:
        d_inner = self.mamba_expand * self.hidden_size
        if self.mamba_d_head == "auto":
            if d_inner % self.mamba_n_heads:
                raise ConfigError(
                    f"mamba_d_head is 'auto' but mamba_expand * hidden_size = {d_inner} is not "
                    f"divisible by mamba_n_heads {self.mamba_n_heads}."
                )
            self.mamba_d_head = d_inner // self.mamba_n_heads
        if not isinstance(self.mamba_d_head, int) or self.mamba_d_head <= 0:
            raise ConfigError(f"mamba_d_head must be a positive integer or 'auto', found "
                              f"{self.mamba_d_head!r}.")
        if self.mamba_n_heads * self.mamba_d_head != d_inner:
            raise ConfigError(
                f"mamba_n_heads * mamba_d_head = {self.mamba_n_heads} * {self.mamba_d_head} must "
                f"equal mamba_expand * hidden_size = {d_inner}."
            )
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ConfigError(
                f"mamba_n_heads {self.mamba_n_heads} is not divisible by mamba_n_groups "
                f"{self.mamba_n_groups}."
            )

    # Derived sizes.
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def use_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def has_mamba(self) -> bool:
        return "mamba" in self.layer_types

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.mamba_n_groups * self.mamba_d_state

    @property
    def softmax_scale(self) -> float:
        if self.attention_multiplier is None:
            return self.head_dim**-0.5
        return float(self.attention_multiplier)

    def to_hub_dict(self) -> dict[str, Any]:
        """The config spelled the way IBM's Hub checkpoints spell it."""
        out: dict[str, Any] = {
            "architectures": ["GraniteMoeHybridForCausalLM"],
        }
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "time_step_limit":
                lo, hi = value
                if math.isinf(hi):
                    continue  # absent means (0, inf), which every reader understands
                value = [lo, hi]
            if value is None and f.name in ("torch_dtype", "rope_scaling"):
                continue
            out[f.name] = value
        out["position_embedding_type"] = self.position_embedding_type
        return out


def _show(value: Any) -> str:
    """A value for an error message: its JSON-ish repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no integer


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _is_size(value: Any) -> bool:
    return _is_int(value) and -MAX_DIM <= value <= MAX_DIM


def _is_token_id(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= MAX_DIM


# Field annotation -> (test of the raw JSON value, what to call the expected type).
_TYPE_RULES: dict[str, tuple[Any, str]] = {
    "int": (_is_size, f"an integer (at most {MAX_DIM} in size)"),
    "float": (_is_finite_number, "a finite number"),
    "float | None": (lambda v: v is None or _is_finite_number(v), "a finite number or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "dict | None": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "int | str": (lambda v: _is_size(v) or v == "auto", 'an integer or "auto"'),
    "int | None": (lambda v: v is None or _is_token_id(v), "a token id (integer >= 0) or null"),
    "int | list[int] | None": (
        lambda v: v is None
        or _is_token_id(v)
        or (isinstance(v, list) and all(_is_token_id(x) for x in v)),
        "a token id, a list of token ids, or null",
    ),
}
# Read by their own parsers (several spellings each).
_OWN_PARSER = {"layer_types", "time_step_limit"}
# Raw keys that are not fields but feed one.
_RAW_RULES = {
    "rope_parameters": _TYPE_RULES["dict | None"],
    "dtype": _TYPE_RULES["str | None"],  # transformers 5's name for torch_dtype
    "layers_block_type": (lambda v: v is None or isinstance(v, list), "a list or null"),
}


def _check_types(config: dict[str, Any]) -> None:
    """Refuse a known key whose JSON value has the wrong type, naming the key, the
    expected type and the value: nothing is coerced ("false" is not false)."""
    rules = {
        f.name: _TYPE_RULES[f.type] for f in fields(ModelArgs) if f.name not in _OWN_PARSER
    }
    rules.update(_RAW_RULES)
    for name, (ok, expected) in rules.items():
        if name in config and not ok(config[name]):
            value = config[name]
            raise ConfigError(
                f"config.json field {name} must be {expected}, found {_show(value)} "
                f"({type(value).__name__}). Fix config.json or download the checkpoint again."
            )
    params = config.get("rope_parameters") or {}
    if "rope_theta" in params and not _is_finite_number(params["rope_theta"]):
        raise ConfigError(
            f"config.json field rope_parameters.rope_theta must be a finite number, found "
            f"{_show(params['rope_theta'])}."
        )


def _layer_types(config: dict) -> list[str]:
    raw = config.get("layer_types")
    key = "layer_types"
    if raw is None:
        raw, key = config.get("layers_block_type"), "layers_block_type"
    if raw is None:
        # Nothing says otherwise: a plain transformer (num_hidden_layers is type-checked).
        return ["attention"] * config.get("num_hidden_layers", 0)
    if not isinstance(raw, list):
        raise ConfigError(f"{key} must be a list of layer kinds, found {type(raw).__name__}.")
    kinds = []
    for i, kind in enumerate(raw):
        if not isinstance(kind, str) or kind not in _LAYER_KIND:
            raise ConfigError(
                f"{key}[{i}] is {_show(kind)}; expected one of {sorted(_LAYER_KIND)}."
            )
        kinds.append(_LAYER_KIND[kind])
    return kinds


def _rope(config: dict) -> dict:
    """Positions and RoPE parameters from either spelling."""
    out: dict[str, Any] = {}
    pos = config.get("position_embedding_type")
    out["position_embedding_type"] = "nope" if pos is None else str(pos).lower()
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    theta = config.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = params
    if theta is not None:
        out["rope_theta"] = float(theta)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in (
        None, "default",
    ):  # fmt: skip
        kind = scaling.get("rope_type", scaling.get("type"))
        if out["position_embedding_type"] == "rope" and kind != "linear":
            raise ConfigError(
                f"rope_scaling type {kind!r} is not supported (only 'default' and 'linear')."
            )
        out["rope_scaling"] = scaling
    else:
        out["rope_scaling"] = None
    return out


def _float(value: Any, where: str) -> float:
    if isinstance(value, dict) and "__float__" in value:  # transformers 5 re-save
        value = value["__float__"]
    if isinstance(value, str):
        try:
            return float(value)  # "Infinity", "inf"
        except ValueError:
            pass
    if _is_number(value):
        return float(value)
    raise ConfigError(f"time_step_limit {where} must be a number, found {_show(value)}.")


def _time_step_limit(value: Any) -> tuple[float, float]:
    if value is None:
        return (0.0, math.inf)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"time_step_limit must be [min, max], found {_show(value)}.")
    return (_float(value[0], "min"), _float(value[1], "max"))
