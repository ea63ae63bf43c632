"""The compiled decode step (granite_mlx.decode) equals the plain modules, token
for token, and the reference switch turns it off."""

import mlx.core as mx
import pytest
from mlx import nn

from granite_mlx.cache import KVCache
from granite_mlx.shapes import random_model

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=8,
            mamba_d_head=16, mamba_d_state=16, shared_intermediate_size=96, intermediate_size=32,
            vocab_size=300, mamba_chunk_size=16)  # fmt: skip
CASES = {
    "hybrid": dict(num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"]),
    "dense_rope": dict(shape="1b", num_hidden_layers=2, layer_types=["attention"] * 2),
    "moe_groups2": dict(num_hidden_layers=2, layer_types=["mamba", "attention"], mamba_n_groups=2,
                        num_local_experts=4, num_experts_per_tok=2),
}  # fmt: skip


def tiny(case, dtype=mx.float32):
    spec = dict(CASES[case])
    shape = spec.pop("shape", "h-350m")
    return random_model(shape, dtype=dtype, seed=3, **{**TINY, **spec})


def decode(model, compiled, n=270, dtype_tol=0.0):
    model.compiled_decode = compiled
    cache = model.make_cache()
    prompt = mx.random.randint(0, 300, (2, 5), key=mx.random.key(0))
    logits = model(prompt, cache)[:, -1:]
    toks, all_logits = [], []
    for _ in range(n):  # past 256 positions: the KV buffers grow once
        tok = mx.argmax(logits, axis=-1)
        toks.append(tok)
        logits = model(tok, cache)
        all_logits.append(logits)
    return mx.concatenate(toks, axis=1), mx.concatenate(all_logits, axis=1)


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_equals_plain(case):
    model = tiny(case)
    t1, l1 = decode(model, True)
    assert model._decoder is not None
    t2, l2 = decode(model, False)
    assert mx.array_equal(t1, t2)
    assert mx.allclose(l1, l2, atol=1e-5, rtol=1e-5)


def test_compiled_equals_plain_quantized_bf16():
    model = tiny("moe_groups2", dtype=mx.bfloat16)
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    t1, _ = decode(model, True, n=40)
    t2, _ = decode(model, False, n=40)
    assert mx.array_equal(t1, t2)


def test_reference_switch(monkeypatch):
    monkeypatch.setenv("GRANITE_MLX_REFERENCE", "1")
    model = tiny("hybrid")
    decode(model, True, n=3)
    assert model._decoder is None


def test_kv_capacity_grows_in_steps():
    cache = KVCache()
    k = mx.zeros((1, 2, 1, 4))
    for _ in range(257):
        cache.update_and_fetch(k, k)
    assert cache.offset == 257 and cache.keys.shape[2] == 512


@pytest.mark.parametrize("s, l", [(1500, 1500), (3000, 700), (2049, 1)])
def test_blocked_attention_equals_sdpa(s, l):
    from granite_mlx.model import blocked_causal_attention

    keys = mx.random.split(mx.random.key(s + l), 3)
    q = mx.random.normal((1, 4, l, 16), key=keys[0])
    k = mx.random.normal((1, 2, s, 16), key=keys[1])
    v = mx.random.normal((1, 2, s, 16), key=keys[2])
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal" if l > 1 else None)
    assert mx.allclose(blocked_causal_attention(q, k, v, 0.25), ref, atol=1e-5, rtol=1e-4)
