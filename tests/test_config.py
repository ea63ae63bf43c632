"""ModelArgs accepts every config spelling met in the wild and refuses bad sizes."""

import json
import math
from pathlib import Path

import pytest

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
    ],
)
def test_bad_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ModelArgs.from_dict(base(**changes))
