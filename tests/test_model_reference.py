"""Logits equal transformers' GraniteMoeHybridForCausalLM on the committed tiny
checkpoints (made by make_reference.py), in every layout and through the cache."""

import os

import mlx.core as mx
import numpy as np
import pytest
from conftest import CASES, REFERENCE, TF32_SWITCH, checkpoint

from granite_mlx import load_model


def reference(case):
    return mx.load(str(REFERENCE / f"{case}.safetensors"))


def rel_err(a, ref):
    return (mx.abs(a.astype(mx.float32) - ref).max() / mx.abs(ref).max()).item()


@pytest.mark.parametrize("layout", ["hub", "transformers"])
@pytest.mark.parametrize("case", CASES)
def test_float32_logits_match_reference(case, layout):
    if not checkpoint(case, layout).exists():
        pytest.skip(f"no {layout} layout for {case}")
    ref = reference(case)
    logits = load_model(checkpoint(case, layout))(ref["input_ids"])
    assert logits.shape == ref["logits_f32"].shape
    assert rel_err(logits, ref["logits_f32"]) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_within_reference_bf16_error(case):
    """bf16 rounding is inherent: the bound is transformers' own bf16 error on the
    same model and inputs (committed), times two for a different but equally valid
    order of roundings, and never looser than 2% of the logits' scale."""
    ref = reference(case)
    logits = load_model(checkpoint(case), dtype="bfloat16")(ref["input_ids"])
    assert logits.dtype == mx.bfloat16
    torch_err = rel_err(ref["logits_bf16"], ref["logits_f32"])
    ours = rel_err(logits, ref["logits_f32"])
    assert ours <= min(2 * torch_err, 0.02), (ours, torch_err)


SPLITS = [[37], [20, 17], [16, 5, 1, 1, 14], [1] * 6 + [31], [3, 1, 1, 32]]


@pytest.mark.parametrize("case", CASES)
def test_cache_in_any_split_equals_full_forward(case):
    ref = reference(case)
    model = load_model(checkpoint(case))
    tokens = ref["input_ids"]
    full = model(tokens)
    for split in SPLITS:
        cache = model.make_cache()
        pieces, start = [], 0
        for n in split:
            pieces.append(model(tokens[:, start : start + n], cache))
            start += n
        stepped = mx.concatenate(pieces, axis=1)
        assert rel_err(stepped, full) < 1e-5, split
        assert cache[0].offset == tokens.shape[1]


def test_float32_products_run_in_full_float32():
    """The suite's 1e-5 float32 tolerances need full float32 products; on CUDA
    (and M5-class Apple GPUs) MLX would use TF32 (~1e-3 relative) unless told
    not to, which conftest.py does for the suite and its subprocesses."""
    assert os.environ.get(TF32_SWITCH) == "0"
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 512)), rng.standard_normal((512, 64))
    got = np.array(mx.array(a, mx.float32) @ mx.array(b, mx.float32))
    assert np.abs(got - a @ b).max() / np.abs(a @ b).max() < 1e-5
