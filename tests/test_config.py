"""ModelArgs accepts every config spelling met in the wild and refuses bad sizes."""

import json
import math
from pathlib import Path

import pytest
from conftest import checkpoint

from granite_mlx import ConfigError, ModelArgs
from granite_mlx.shapes import SHAPES, shape_config

SHARED_CONFIGS = Path(__file__).parent / "fixtures" / "configs"


@pytest.mark.parametrize("name", ["granite-4.0-1b.json", "granite-4.0-h-350m.resaved.json"])
def test_real_configs_load(name):
    args = ModelArgs.from_dict(json.loads((SHARED_CONFIGS / name).read_text()))
    if "h-350m" in name:
        assert args.layer_types.count("attention") == 4
        assert [i for i, k in enumerate(args.layer_types) if k == "attention"] == [10, 13, 17, 27]
        assert args.time_step_limit == (0.0, math.inf)
        assert args.position_embedding_type == "nope"
        assert args.mamba_d_head == 32 and args.torch_dtype == "bfloat16"
    else:
        assert set(args.layer_types) == {"attention"}
        assert args.position_embedding_type == "rope" and args.rope_theta == 1e7


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_released_shape_is_expressible(name):
    args = ModelArgs.from_dict(shape_config(name))
    assert len(args.layer_types) == args.num_hidden_layers


def base(**changes):
    cfg = shape_config("h-350m")
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize(
    "spelling",
    [
        {"layer_types": None, "layers_block_type": ["mamba"] * 31 + ["attention"]},
        {"layer_types": ["linear_attention"] * 31 + ["full_attention"]},
    ],
)
def test_layer_kind_spellings(spelling):
    args = ModelArgs.from_dict(base(**spelling))
    assert args.layer_types == ["mamba"] * 31 + ["attention"]


@pytest.mark.parametrize(
    "limit, expected",
    [
        (None, (0.0, math.inf)),
        ([0.0, float("inf")], (0.0, math.inf)),
        ([0.0, {"__float__": "Infinity"}], (0.0, math.inf)),
        ([0.001, 100.0], (0.001, 100.0)),
    ],
)
def test_time_step_limit_spellings(limit, expected):
    assert ModelArgs.from_dict(base(time_step_limit=limit)).time_step_limit == expected


def test_time_step_limit_infinity_literal_in_json():
    text = json.dumps(base()).replace("}", ', "time_step_limit": [0.0, Infinity]}', 1)
    assert ModelArgs.from_dict(json.loads(text)).time_step_limit[1] == math.inf


def test_rope_spellings():
    a = ModelArgs.from_dict(base(position_embedding_type="rope", rope_theta=5e5))
    b = ModelArgs.from_dict(
        base(position_embedding_type="rope", rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    )
    assert a.rope_theta == b.rope_theta == 5e5
    assert ModelArgs.from_dict(base(position_embedding_type=None)).position_embedding_type == "nope"


def test_d_head_auto():
    assert ModelArgs.from_dict(base(mamba_d_head="auto")).mamba_d_head == 32


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"num_attention_heads": 7}, "num_attention_heads"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"mamba_d_head": 30}, "mamba_d_head"),
        ({"mamba_n_groups": 5}, "mamba_n_groups"),
        ({"layer_types": ["mamba"] * 3}, "layer_types"),
        ({"layer_types": ["mamba"] * 31 + ["conv"]}, "layer_types[31]"),
        ({"num_local_experts": 4, "num_experts_per_tok": 6}, "num_experts_per_tok"),
        ({"position_embedding_type": "alibi"}, "position_embedding_type"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"time_step_limit": [1.0, 0.5]}, "time_step_limit"),
        ({"position_embedding_type": "rope", "rope_scaling": {"rope_type": "yarn", "factor": 4}},
         "rope_scaling"),
        # JSON types: named, never coerced (the cases).
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
        ({"hidden_size": 32.0}, "hidden_size must be an integer"),
        ({"num_hidden_layers": "x"}, "num_hidden_layers must be an integer"),
        ({"num_local_experts": "2"}, "num_local_experts must be an integer"),
        ({"num_experts_per_tok": "a"}, "num_experts_per_tok must be an integer"),
        ({"rope_theta": "abc"}, "rope_theta must be a finite number"),
        ({"max_position_embeddings": -5}, "max_position_embeddings must be a positive"),
        ({"max_position_embeddings": "big"}, "max_position_embeddings must be an integer"),
        ({"embedding_multiplier": "12"}, "embedding_multiplier must be a finite number, found '1"),
        ({"residual_multiplier": float("nan")}, "residual_multiplier must be a finite number"),
        ({"logits_scaling": float("inf")}, "logits_scaling must be a finite number"),
        ({"vocab_size": 10**12}, "vocab_size must be an integer"),
        ({"hidden_size": 2**30, "num_attention_heads": 1, "num_key_value_heads": 1,
          "mamba_d_head": "auto", "mamba_n_heads": 1}, "mamba in_proj width"),
        ({"position_embedding_type": "rope", "rope_scaling": {"type": "linear", "factor": "2"}},
         "rope_scaling factor"),
    ],
)
def test_bad_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")) as info:
        ModelArgs.from_dict(base(**changes))
    # ... and the value found there, as JSON would show it.
    if len(changes) == 1 and not isinstance(value := next(iter(changes.values())), (dict, list)):
        assert repr(value) in str(info.value) or str(value) in str(info.value), str(info.value)


# --- Property: every known key's JSON type is checked, nothing is coerced ---------

CHECKPOINT_CONFIGS = sorted(
    (Path(__file__).parent / "fixtures" / "checkpoints").glob("*/*/config.json")
)
REAL_CONFIGS = sorted(SHARED_CONFIGS.glob("*.json")) + CHECKPOINT_CONFIGS

# The JSON types each key may hold (Hugging Face's meaning of the key). "int" is a
# JSON number written without a fraction, "float" one with it (32.0 counts as float:
# a size written that way is a mistake to report, not to round).
NUMBER = {"int", "float"}
ACCEPTED = {
    "model_type": {"string"},
    "vocab_size": {"int"}, "hidden_size": {"int"}, "num_hidden_layers": {"int"},
    "num_attention_heads": {"int"}, "num_key_value_heads": {"int"},
    "intermediate_size": {"int"}, "shared_intermediate_size": {"int"},
    "num_local_experts": {"int"}, "num_experts_per_tok": {"int"},
    "max_position_embeddings": {"int"},
    "mamba_n_heads": {"int"}, "mamba_d_head": {"int", "string"}, "mamba_d_state": {"int"},
    "mamba_n_groups": {"int"}, "mamba_d_conv": {"int"}, "mamba_expand": {"int"},
    "mamba_chunk_size": {"int"},
    "embedding_multiplier": NUMBER, "residual_multiplier": NUMBER, "logits_scaling": NUMBER,
    "rms_norm_eps": NUMBER, "rope_theta": NUMBER, "attention_multiplier": NUMBER | {"null"},
    "tie_word_embeddings": {"bool"}, "attention_bias": {"bool"},
    "mamba_conv_bias": {"bool"}, "mamba_proj_bias": {"bool"},
    "hidden_act": {"string"}, "position_embedding_type": {"string", "null"},
    "rope_scaling": {"object", "null"}, "rope_parameters": {"object", "null"},
    "layer_types": {"array", "null"}, "layers_block_type": {"array", "null"},
    "time_step_limit": {"array", "null"},
    "bos_token_id": {"int", "null"}, "pad_token_id": {"int", "null"},
    "eos_token_id": {"int", "array", "null"},
    "torch_dtype": {"string", "null"}, "dtype": {"string", "null"},
}  # fmt: skip
# One value of every JSON type, and the in-type values a lenient loader would coerce.
VALUES = [
    None, True, False, 0, -5, 7, 10**12, 32.0, 1.5, float("nan"), float("inf"),
    "", "x", "12", "false", "auto", [], [1], ["mamba"], {}, {"factor": "2"},
]  # fmt: skip


def json_kind(value) -> str:
    if value is None:
        return "null"
    for kind, types in [("bool", bool), ("int", int), ("float", float), ("string", str),
                        ("array", list), ("object", dict)]:  # fmt: skip
        if isinstance(value, types):
            return kind
    raise AssertionError(value)


def mutations(config):
    for key in config:
        for value in VALUES:
            if json_kind(value) != json_kind(config[key]) or key in ACCEPTED:
                yield key, value


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_field_with_any_json_type_loads_or_is_one_config_error(path):
    """Every key of a real config, replaced by values of other JSON types (and by
    in-type values a loader might coerce): a ConfigError that names the key, or a
    config that loads; a wrong JSON type for a known key never loads, an unknown
    key never changes the model."""
    original = json.loads(path.read_text())
    base = ModelArgs.from_dict(original)
    for key, value in mutations(original):
        config = {**original, key: value}
        kind = json_kind(value)
        try:
            args = ModelArgs.from_dict(config)
        except ConfigError as e:
            assert "\n" not in str(e)
            if key in ACCEPTED and kind not in ACCEPTED[key]:
                assert key in str(e), (key, value, str(e))
            continue
        if key not in ACCEPTED:
            assert args == base, (key, value)  # unknown keys are ignored
        else:
            assert kind in ACCEPTED[key], f"{key}={value!r} ({kind}) loaded as {args}"


@pytest.mark.parametrize("case", ["hybrid_nope", "dense_rope_untied", "moe_hybrid"])
def test_every_accepted_mutation_builds_a_model_or_a_checkpoint_error(case, monkeypatch):
    """The configs that pass from_dict but describe another model go all the way
    through load_model: a loaded model or a ConfigError/CheckpointError, never
    another exception."""
    from granite_mlx import CheckpointError, loading

    folder = checkpoint(case)
    original = json.loads((folder / "config.json").read_text())
    base = ModelArgs.from_dict(original)
    loaded = refused = 0
    for key, value in mutations(original):
        config = {**original, key: value}
        try:
            if ModelArgs.from_dict(config) == base:
                continue
        except ConfigError:
            continue
        monkeypatch.setattr(loading, "load_config", lambda _folder, c=config: c)
        try:
            loading.load_model(folder)
            loaded += 1
        except (ConfigError, CheckpointError) as e:
            assert "Traceback" not in str(e)
            refused += 1
    assert loaded and refused  # both outcomes are exercised
