"""Caches: snapshot/restore, trimming the attention part, save/load, left padding."""

import mlx.core as mx
import pytest
from conftest import REFERENCE, checkpoint

from granite_mlx import load_model
from granite_mlx.cache import (
    KVCache,
    MambaCache,
    can_trim,
    load_cache,
    restore,
    save_cache,
    snapshot,
    trim,
)


def tokens(case="hybrid_nope"):
    return mx.load(str(REFERENCE / f"{case}.safetensors"))["input_ids"]


def greedy(model, cache, first, n):
    """n greedy tokens after feeding `first` (b, l); returns the list of token columns."""
    logits = model(first, cache)
    out = []
    for _ in range(n):
        tok = mx.argmax(logits[:, -1:], axis=-1)
        out.append(tok)
        logits = model(tok, cache)
    return mx.concatenate(out, axis=1)


@pytest.fixture(scope="module")
def hybrid():
    return load_model(checkpoint("hybrid_nope"))


def test_make_cache_kinds(hybrid):
    cache = hybrid.make_cache()
    kinds = [layer.kind for layer in hybrid.layers]
    assert [type(c) for c in cache] == [MambaCache if k == "mamba" else KVCache for k in kinds]
    assert not can_trim(cache)


def test_snapshot_then_restore_continues_identically(hybrid):
    t = tokens()
    cache = hybrid.make_cache()
    hybrid(t[:, :20], cache)
    snap = snapshot(cache)
    first = greedy(hybrid, cache, t[:, 20:25], 6)
    restore(cache, snap)
    assert cache[0].offset == 20
    again = greedy(hybrid, cache, t[:, 20:25], 6)
    assert mx.array_equal(first, again)
    # And the logits after restore equal a fresh run over the same tokens.
    restore(cache, snap)
    a = hybrid(t[:, 20:30], cache)
    fresh = hybrid.make_cache()
    b = hybrid(t[:, :30], fresh)[:, 20:]
    assert mx.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_trim_attention_only_model():
    model = load_model(checkpoint("dense_rope_untied"))
    t = tokens("dense_rope_untied")
    cache = model.make_cache()
    assert can_trim(cache)
    model(t[:, :30], cache)
    assert trim(cache, 10) == 10 and cache[0].offset == 20
    a = model(t[:, 20:25], cache)
    b = model(t[:, :25])[:, 20:]
    assert mx.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_trim_refused_with_mamba_layers(hybrid):
    cache = hybrid.make_cache()
    hybrid(tokens()[:, :5], cache)
    with pytest.raises(ValueError, match="snapshot"):
        trim(cache, 2)


@pytest.mark.parametrize("case", ["hybrid_nope", "dense_rope_untied"])
def test_save_load_round_trip(tmp_path, case):
    model = load_model(checkpoint(case))
    t = tokens(case)
    cache = model.make_cache()
    model(t[:, :17], cache)
    save_cache(tmp_path / "c.safetensors", cache, {"note": "hi"})
    loaded, meta = load_cache(tmp_path / "c.safetensors")
    assert meta == {"note": "hi"} and loaded[0].offset == 17
    a = greedy(model, cache, t[:, 17:20], 5)
    b = greedy(model, loaded, t[:, 17:20], 5)
    assert mx.array_equal(a, b)
    assert not list(tmp_path.glob("*.partial*"))


def test_load_cache_rejects_other_files(tmp_path):
    from granite_mlx import CheckpointError

    mx.save_safetensors(str(tmp_path / "x.safetensors"), {"a": mx.zeros(2)})
    with pytest.raises(CheckpointError, match="not a granite-mlx cache"):
        load_cache(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated"):
        load_cache(tmp_path / "y.safetensors")


@pytest.mark.parametrize("case", ["hybrid_nope", "dense_rope_untied", "moe_hybrid"])
def test_left_padded_batch_rows_equal_single_runs(case):
    """Padding is kept out of attention and out of the Mamba2 conv window and state."""
    model = load_model(checkpoint(case))
    t = tokens(case)
    lengths = [37, 12]
    pad = [max(lengths) - n for n in lengths]
    rows = [t[0, :37], t[1, :12]]
    batch = mx.stack([mx.concatenate([mx.zeros((p,), mx.int32), r]) for p, r in zip(pad, rows)])
    cache = model.make_cache(left_padding=pad)
    out = greedy(model, cache, batch, 6)
    for i, r in enumerate(rows):
        single = greedy(model, model.make_cache(), r[None], 6)
        assert mx.array_equal(out[i : i + 1], single), (case, i)
