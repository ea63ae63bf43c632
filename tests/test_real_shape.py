"""A random-weight model of the exact H-350M shape loads, prefills 64 tokens and
decodes 4 (built here, never committed). Times go to the README by hand, from
`python benchmarks/real_shape_smoke.py`; this test only checks it runs right."""

import mlx.core as mx

from granite_mlx.cache import snapshot
from granite_mlx.shapes import count_parameters, random_model


def test_h350m_shape_prefill_and_decode():
    model = random_model("h-350m", dtype=mx.bfloat16)
    assert count_parameters(model) == 340_332_224  # as GRANITE.md counts it
    cache = model.make_cache()
    prompt = mx.random.randint(0, model.args.vocab_size, (1, 64), key=mx.random.key(0))
    logits = model(prompt, cache)
    assert logits.shape == (1, 64, 100352)
    snapshot(cache)
    tok = mx.argmax(logits[:, -1:], axis=-1)
    for _ in range(4):
        logits = model(tok, cache)
        tok = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(tok)
    assert cache[0].offset == 68
    assert bool(mx.all(mx.isfinite(logits.astype(mx.float32))).item())
