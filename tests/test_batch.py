"""batch_generate: left-padded rows of mixed lengths answer as each prompt does alone."""

from __future__ import annotations

import copy
import threading

import mlx.core as mx
import pytest
from conftest import REFERENCE
from test_generate import real_vocab, tiny

from granite_mlx import batch_generate, generate, stream_generate
from granite_mlx.batch import stream_batch_generate


def prompts_of(case: str) -> list[list[int]]:
    ids = mx.load(str(REFERENCE / f"{case}.safetensors"))["input_ids"].tolist()
    return [ids[0][:23], ids[1][:6], ids[0][5:18]]  # three lengths, padding 0, 17 and 10


def run_batch(model, tokenizer, prompts, **options):
    """Per row: (tokens, finish_reason, text)."""
    rows = [([], None, "") for _ in prompts]
    for step in stream_batch_generate(model, tokenizer, prompts, **options):
        for i, r in enumerate(step):
            if r is not None:
                tokens, _, text = rows[i]
                rows[i] = (tokens + [r.token], r.finish_reason, text + r.text)
    return rows


def run_single(model, tokenizer, prompt, **options):
    responses = list(stream_generate(model, tokenizer, prompt, **options))
    return (
        [r.token for r in responses],
        responses[-1].finish_reason,
        "".join(r.text for r in responses),
    )


@pytest.mark.parametrize("case", ["hybrid_nope", "dense_rope_untied", "moe_hybrid"])
def test_batch_rows_equal_single_runs(case):
    model, tokenizer = tiny(case)
    prompts = prompts_of(case)
    batch = run_batch(model, tokenizer, prompts, max_tokens=8)
    for prompt, row in zip(prompts, batch):
        assert row == run_single(model, tokenizer, prompt, max_tokens=8)
        assert row[1] == "length" and len(row[0]) == 8


def test_rows_finish_independently_on_eos_and_stop():
    model, tokenizer = tiny("hybrid_nope")
    prompts = prompts_of("hybrid_nope")
    alone = [run_single(model, tokenizer, p, max_tokens=10)[0] for p in prompts]
    # An EOS that row 0 samples early and the other rows never sample.
    others = set(alone[1]) | set(alone[2])
    eos = next(t for t in alone[0][1:] if t not in others)
    tokenizer = copy.copy(tokenizer)
    tokenizer.eos_token_ids = {eos}
    batch = run_batch(model, tokenizer, prompts, max_tokens=10)
    singles = [run_single(model, tokenizer, p, max_tokens=10) for p in prompts]
    assert batch == singles
    assert batch[0][1] == "stop" and len(batch[0][0]) < 10
    assert batch[1][1] == "length" and len(batch[1][0]) == 10
    # Stop strings, per row.
    stop = singles[2][2][2:4] or "never"
    batch = run_batch(model, tokenizer, prompts, max_tokens=10, stop=stop)
    assert batch == [run_single(model, tokenizer, p, max_tokens=10, stop=stop) for p in prompts]


def test_batch_generate_returns_each_answer():
    model, tokenizer = real_vocab()
    prompts = ["Hello, world!", [{"role": "user", "content": "What is the capital of France?"}]]
    answers = batch_generate(model, tokenizer, prompts, max_tokens=6)
    assert answers == [generate(model, tokenizer, p, max_tokens=6) for p in prompts]


def test_batch_cancel_ends_every_row():
    model, tokenizer = tiny("moe_hybrid")
    cancel = threading.Event()
    steps = []
    for step in stream_batch_generate(
        model, tokenizer, prompts_of("moe_hybrid"), max_tokens=20, cancel=cancel
    ):
        steps.append(step)
        cancel.set()
    assert len(steps) == 2
    finished = [
        next(r.finish_reason for r in (s[i] for s in steps) if r and r.finish_reason)
        for i in range(3)
    ]
    assert "cancelled" in finished and set(finished) <= {"cancelled", "stop"}
