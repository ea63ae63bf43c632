"""`granite-mlx bench`'s measuring parts, on a tiny model: the mlx-lm twin holds
the same weights, graph counting works, and the decode breakdown restores the
model it takes apart. (Speed itself is measured by hand, never in tests.)"""

import mlx.core as mx
import pytest
from mlx import nn

from granite_mlx import bench
from granite_mlx.shapes import random_model

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=8,
            mamba_d_head=16, mamba_d_state=16, shared_intermediate_size=96, vocab_size=300,
            intermediate_size=96,
            mamba_chunk_size=16, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"])  # fmt: skip
# (intermediate_size = shared_intermediate_size, as in H-350M: mlx-lm sizes the
# shared MLP from intermediate_size.)


@pytest.fixture
def model():
    return random_model("h-350m", dtype=mx.float32, seed=5, **TINY)


def test_mlx_lm_twin_gives_our_logits(model):
    pytest.importorskip("mlx_lm")
    twin = bench.mlx_lm_twin(model)
    tokens = mx.random.randint(0, 300, (1, 11), key=mx.random.key(2))
    ours, theirs = model(tokens), twin(tokens)
    assert mx.abs(ours - theirs).max().item() < 1e-4 * mx.abs(ours).max().item()


def test_twin_of_a_quantized_model_is_quantized_alike(model):
    pytest.importorskip("mlx_lm")
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                and not isinstance(m, nn.Embedding))  # fmt: skip
    twin = bench.mlx_lm_twin(model)
    tokens = mx.random.randint(0, 300, (1, 7), key=mx.random.key(3))
    assert mx.abs(model(tokens) - twin(tokens)).max().item() < 1e-3 * mx.abs(model(tokens)).max().item()


def test_compiled_step_has_fewer_primitives(model):
    compiled = bench.decode_graph_size(model, model.make_cache)
    model.compiled_decode = False
    plain = bench.decode_graph_size(model, model.make_cache)
    assert 0 < compiled < plain


def test_decode_breakdown_restores_the_model(model):
    tokens = mx.array([[1, 2, 3]])
    before = model(tokens)
    b = bench.matmul_share(model, repeats=2, rounds=2)
    assert b["step_ms"] > 0 and b["outside_matmul_ms"] > 0 and b["matmul_ms"] > 0
    assert 0 < b["outside_matmul_share"] == b["outside_matmul_ms"] / b["step_ms"]
    assert "logits" not in model.__dict__
    assert not any(isinstance(m, bench._FreeProduct) for _, m in model.named_modules())
    assert mx.array_equal(model(tokens), before)
    cache = model.make_cache()  # and the compiled step still decodes for real
    model(tokens, cache)
    step = model(mx.array([[4]]), cache)
    assert mx.allclose(step[:, -1], model(mx.array([[1, 2, 3, 4]]))[:, -1], atol=1e-4)


def test_layer_subset_keeps_attention():
    from argparse import Namespace

    o = bench._overrides(Namespace(shape="h-350m", layers=4))
    assert o["num_hidden_layers"] == 4 and o["layer_types"].count("attention") == 1


def test_decode_breakdown_of_mlx_lm_restores_it(model):
    pytest.importorskip("mlx_lm")
    twin = bench.mlx_lm_twin(model)
    tokens = mx.array([[1, 2, 3]])
    before = twin(tokens)
    b = bench.matmul_share(twin, twin.make_cache, repeats=2, rounds=2)
    assert 0 < b["outside_matmul_share"]
    assert mx.array_equal(twin(tokens), before)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompts", "abc"], "--prompts: 'abc' is not a comma-separated list of token counts"),
        (["--prompts", "512,0"], "every prompt length must be at least 1"),
        (["--repeats", "0"], "--repeats: must be at least 1, not 0"),
        (["--decode", "0"], "--decode: must be at least 1, not 0"),
        (["--decode", "1.5"], "--decode: '1.5' is not a whole number"),
        (["--prefill-step", "-4"], "--prefill-step: must be at least 1"),
        (["--shape", "h-2b"], "invalid choice: 'h-2b' (choose from 'h-350m', 'h-1b', '350m'"),
        (["--layers", "33"], "--layers must be from 1 to 32 (h-350m has 32 layers)"),
        (["--layers", "-1"], "--layers must be from 1 to 32"),
        (["--q-group-size", "48"], "--q-group-size: invalid choice"),
        (["--json", "/no/such/folder/out.json"], "--json /no/such/folder/out.json: the folder"),
    ],
)
def test_bad_arguments_are_one_line_before_any_model_is_built(capsys, monkeypatch, argv, message):
    from granite_mlx import cli

    def build(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(bench, "build_models", build)
    assert cli.main(["bench", *argv]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("granite-mlx: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err, err
