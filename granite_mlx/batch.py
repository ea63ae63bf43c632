"""Several prompts at once: `batch_generate` and its streaming form.

Prompts of different lengths are left-padded to one length and run as one
batch; ``model.make_cache(left_padding=...)`` keeps the padding out of
attention and out of the Mamba2 conv window and state, so each row's greedy
answer is the one that prompt gets alone. Rows finish independently (EOS, a
stop string, max_tokens); a finished row keeps riding along in the batch, its
tokens ignored, until every row is done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import mlx.core as mx

from .generate import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_STEP_SIZE,
    Clock,
    GenerationError,
    GenerationResponse,
    Prompt,
    Stepper,
    TextAssembler,
    check_options,
    check_prompt,
    encode_input,
    prefill,
    stop_list,
)
from .model import Model
from .sampling import LogitsProcessor, build_processors, build_sampler

__all__ = ["batch_generate", "stream_batch_generate"]


def stream_batch_generate(
    model: Model,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    prefill_step_size: int | None = DEFAULT_PREFILL_STEP_SIZE,
    prompt_progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    allow_long_prompt: bool = False,
    logits_processors: Sequence[LogitsProcessor] | None = None,
) -> Iterator[list[GenerationResponse | None]]:
    """Generate for every prompt at once; yields one list per step, one entry per row.

    An entry is that row's `GenerationResponse` for the step, or None once the
    row has finished (its last response carries the finish_reason). Options
    are those of `stream_generate` (``tools``/``documents`` apply to every
    chat prompt); prompt stats count all rows' real tokens.
    """
    check_options(max_tokens, prefill_step_size)
    if not prompts:
        raise GenerationError("batch_generate needs at least one prompt.")
    rows = [encode_input(tokenizer, p, tools, documents) for p in prompts]
    for ids in rows:
        check_prompt(model, ids, 0, allow_long_prompt)
    sampler = build_sampler(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    processors = build_processors(repetition_penalty, repetition_context_size, logits_processors)
    return _decode_batch(
        model, tokenizer, rows, sampler, seed, processors, max_tokens, stop_list(stop),
        prefill_step_size, prompt_progress or (lambda done, total: None), cancel,
    )  # fmt: skip


def _decode_batch(
    model, tokenizer, rows, sampler, seed, processors, max_tokens, stop, step_size, progress, cancel
) -> Iterator[list[GenerationResponse | None]]:
    if seed is not None:
        mx.random.seed(seed)
    width = max(len(ids) for ids in rows)
    padding = [width - len(ids) for ids in rows]
    # Padding is masked out, but its embeddings are still computed (and multiplied
    # by 0, which keeps NaN a NaN): pad with an id every vocabulary has.
    tokens = mx.array([[0] * p + ids for p, ids in zip(padding, rows)], dtype=mx.int32)
    cache = model.make_cache(left_padding=padding)
    clock = Clock(sum(len(ids) for ids in rows))
    eos = set(tokenizer.eos_token_ids)
    texts = [TextAssembler(tokenizer, stop) for _ in rows]
    step = Stepper(model, cache, sampler, processors, [ids[:-1] for ids in rows])
    live = set(range(len(rows)))

    def finish_all(reason: str, n: int) -> list[GenerationResponse | None]:
        out: list[GenerationResponse | None] = [None] * len(rows)
        for i in sorted(live):
            shown, calls = texts[i].finish()
            out[i] = clock.response(shown, None, None, reason, calls, n)
        live.clear()
        return out

    if not prefill(model, cache, tokens, step_size, progress, cancel):
        yield finish_all("cancelled", 0)
        return
    y, logprob = step(tokens[:, -1:])
    mx.async_eval(y, logprob)

    n = 0
    while live:
        if cancel is not None and cancel.is_set():
            yield finish_all("cancelled", n)
            return
        last = max_tokens is not None and n + 1 >= max_tokens
        if not last:
            next_y, next_logprob = step(y[:, None])
            mx.async_eval(next_y, next_logprob)
        sampled, logprobs = y.tolist(), logprob.tolist()
        n += 1
        if n == 1:
            clock.first_token()
            progress(width, width)
        out: list[GenerationResponse | None] = [None] * len(rows)
        for i in sorted(live):
            token, lp = sampled[i], logprobs[i]
            if token in eos:
                shown, calls = texts[i].finish()
                finish: str | None = "stop"
            else:
                shown, calls = texts[i].add(token)
                finish = "stop" if texts[i].stopped else "length" if last else None
                if finish is not None:
                    rest, more = texts[i].finish()
                    shown, calls = shown + rest, calls + more
            out[i] = clock.response(shown, token, lp, finish, calls, n)
            if finish is not None:
                live.discard(i)
        yield out
        if n % 256 == 0:
            mx.clear_cache()
        if live:
            y, logprob = next_y, next_logprob


def batch_generate(
    model: Model, tokenizer: Any, prompts: Sequence[Prompt], **options: Any
) -> list[str]:
    """Each prompt's whole answer, in order; takes `stream_generate`'s options."""
    answers = [""] * len(prompts)
    for step in stream_batch_generate(model, tokenizer, prompts, **options):
        for i, response in enumerate(step):
            if response is not None:
                answers[i] += response.text
    return answers
