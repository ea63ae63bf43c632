"""Several prompts at once: `batch_generate` and its streaming form.

A client of the engine (`granite_mlx.engine`): every prompt becomes a request
and the engine decodes them as one batch, each row sampled with its own key, so
each row's answer is the one that prompt gets alone (greedy, or with the same
seed). Prompts are prefilled one chunk per step while earlier rows already
decode; rows end independently (EOS, a stop string, max_tokens) and leave the
batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .constrain import ConstraintError, build_constraint
from .engine import Engine, GenerationResponse
from .errors import GenerationError
from .generate import DEFAULT_PREFILL_STEP_SIZE, Prompt, encode_input, make_request
from .model import Model

__all__ = ["batch_generate", "stream_batch_generate"]


def stream_batch_generate(
    model: Model,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    prefill_step_size: int | None = DEFAULT_PREFILL_STEP_SIZE,
    cancel: threading.Event | None = None,
    max_batch: int | None = None,
    response_format: Any = None,
    tool_choice: Any = None,
    **options: Any,
) -> Iterator[list[GenerationResponse | None]]:
    """Generate for every prompt at once; yields one list per step, one entry per row.

    An entry is that row's `GenerationResponse` for the step, or None when the
    row produced nothing at that step (not started yet, or finished: its last
    response carries the finish_reason). Options are those of `stream_generate`
    (``tools``/``documents`` apply to every chat prompt); ``max_batch`` caps the
    rows decoding at once (default: all of them). ``response_format`` and
    ``tool_choice`` apply to every row, or, given as a list, one per prompt (rows
    with different schemas, or none, in one batch).
    """
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence):
        raise GenerationError(
            "batch_generate takes a list of prompts; for one prompt use generate() "
            "or pass [prompt]."
        )
    if not prompts:
        raise GenerationError("batch_generate needs at least one prompt.")
    formats = _per_row(response_format, len(prompts), "response_format")
    choices = _per_row(tool_choice, len(prompts), "tool_choice")
    requests = [
        make_request(
            encode_input(tokenizer, p, tools, documents), tools=tools,
            constraint=build_constraint(tokenizer, f, tools, c), **options,
        )
        for p, f, c in zip(prompts, formats, choices)
    ]  # fmt: skip
    engine = Engine(
        model, tokenizer, max_batch=max_batch or len(requests), prefill_step_size=prefill_step_size
    )
    index = {engine.add(r): i for i, r in enumerate(requests)}
    return _steps(engine, index, cancel)


def _per_row(value: Any, rows: int, name: str) -> list:
    """One value for every row, or a list of one per row."""
    if not isinstance(value, list | tuple):
        return [value] * rows
    if len(value) != rows:
        raise ConstraintError(
            f"{name} as a list gives one per prompt: got {len(value)} for {rows} prompts."
        )
    return list(value)


def _steps(engine: Engine, index: dict[int, int], cancel) -> Iterator[list]:
    try:
        while engine.has_work:
            if cancel is not None and cancel.is_set():
                for rid in index:
                    engine.abort(rid)
            out: list[GenerationResponse | None] = [None] * len(index)
            for rid, response in engine.step():
                out[index[rid]] = response
            if any(r is not None for r in out):
                yield out
    finally:
        engine.close()


def batch_generate(
    model: Model, tokenizer: Any, prompts: Sequence[Prompt], **options: Any
) -> list[str]:
    """Each prompt's whole answer, in order; takes `stream_batch_generate`'s options."""
    answers = [""] * len(prompts) if isinstance(prompts, Sequence) else []
    for step in stream_batch_generate(model, tokenizer, prompts, **options):
        for i, response in enumerate(step):
            if response is not None:
                answers[i] += response.text
    return answers
