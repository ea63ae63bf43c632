"""Text generation for one prompt: `load`, `stream_generate`, `generate`, `complete`.

These are clients of the engine (`granite_mlx.engine`): the prompt (text, token
ids or chat messages) becomes token ids, the options a `Request`, and an engine
of one row runs it; `batch_generate`, `ChatSession`, the server and the chat app
drive the same engine. What a request goes through (chunked prefill, the
decode step queued ahead of the detokenizer, stop strings, tool calls) is
described there.

Invariant the chat session relies on: the cache always holds a prefix of
prompt + sampled tokens; `cache_length(cache)` says how long.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .cache import Cache
from .chat_format import encode_prompt
from .constrain import build_constraint
from .engine import (
    DEFAULT_MAX_TOKENS,
    Constraint,
    Engine,
    GenerationResponse,
    Request,
    default_prefill_step_size,
)
from .errors import GenerationError, PromptTooLongError
from .loading import load_model, resolve_model_path
from .model import Model
from .sampling import LogitsProcessor, SamplingParams
from .surrogates import describe_surrogate, surrogate_at
from .text import TextAssembler
from .tokenizer import load_tokenizer
from .tool_calls import ToolCall

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

__all__ = [
    "Completion",
    "GenerationError",
    "GenerationResponse",
    "PromptTooLongError",
    "TextAssembler",
    "complete",
    "default_prefill_step_size",
    "encode_input",
    "generate",
    "load",
    "make_request",
    "run_request",
    "stream_generate",
]

#: A prompt: raw text, token ids, or OpenAI-style chat messages.
Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]] | mx.array

DEFAULT_PREFILL_STEP_SIZE = None  # per device: see default_prefill_step_size()


def load(
    path_or_repo_id: str | os.PathLike,
    dtype: str | mx.Dtype | None = None,
    parallel: str | None = None,
) -> tuple[Model, TokenizerWrapper]:
    """Load a checkpoint's model and tokenizer from one folder (or Hub repo id).

    dtype: "bfloat16", "float16" or "float32" to cast the weights; None keeps
    the checkpoint's own. parallel: "pipeline" or "tensor" to split the model
    across the ranks of `mlx.launch` (see `load_model`).
    """
    folder = resolve_model_path(path_or_repo_id)
    return load_model(folder, dtype, parallel), load_tokenizer(folder)


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------


def encode_input(
    tokenizer: Any,
    prompt: Prompt,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids of a prompt.

    Text is encoded as the tokenizer does (a BOS added only when the tokenizer
    adds one and the text does not start with it); a list of message dicts is
    rendered with the chat template (with ``tools`` and ``documents``).
    """
    if isinstance(prompt, str):
        if tools or documents:
            raise GenerationError(
                "tools= and documents= need a chat prompt: pass a list of messages, not text."
            )
        bad = surrogate_at(prompt)
        if bad is not None:
            raise GenerationError(
                f"The prompt holds {describe_surrogate(prompt, bad)}, which no text encoding "
                "can carry: fix the text (it often comes from a bad JSON escape or invalid UTF-8)."
            )
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
        ids = list(tokenizer.encode(prompt, add_special_tokens=add_special))
    elif isinstance(prompt, mx.array):
        ids = [int(t) for t in prompt.reshape(-1).tolist()]
    else:
        items = list(prompt)
        if items and all(isinstance(m, Mapping) for m in items):
            ids = encode_prompt(tokenizer, items, tools=tools, documents=documents)
        elif all(isinstance(t, int) or hasattr(t, "__index__") for t in items):
            if tools or documents:
                raise GenerationError("tools= and documents= need a chat prompt (messages).")
            ids = [int(t) for t in items]
        else:
            raise GenerationError(
                "The prompt must be a string, a list of token ids or a list of chat messages "
                '({"role": ..., "content": ...} dicts).'
            )
    if not ids:
        raise GenerationError("The prompt is empty: give at least one token.")
    return ids


# --------------------------------------------------------------------------
# Options -> a request; a request -> responses
# --------------------------------------------------------------------------


def make_request(
    ids: Sequence[int],
    *,
    cache: Cache | None = None,
    context: Sequence[int] | None = None,
    snapshot_at: Sequence[int] = (),
    tools: Sequence[Mapping[str, Any]] | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    top_logprobs: int = 0,
    prompt_progress: Callable[[int, int], None] | None = None,
    allow_long_prompt: bool = False,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    constraint: Constraint | None = None,
    draft_model: Any = None,
    num_draft_tokens: int = 4,
    prompt_lookup: int | None = None,
) -> Request:
    """The engine `Request` for `stream_generate`'s options (see there); ``constraint``
    comes from `constrain.build_constraint` (response_format, tool_choice)."""
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
        stop = list(stop)
    else:
        raise GenerationError(f"stop must be a string or a list of strings, got {stop!r}")
    if logits_processors is not None and not all(callable(p) for p in logits_processors):
        raise GenerationError("logits_processors must be callables f(history, logits) -> logits")
    if prompt_progress is not None and not callable(prompt_progress):
        raise GenerationError("prompt_progress must be a callable f(processed, total)")
    sampling = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size,
        seed=seed,
    )  # fmt: skip
    from .speculative import make_drafter

    drafter = make_drafter(draft_model, prompt_lookup)
    return Request(
        prompt=list(ids), max_tokens=max_tokens, sampling=sampling, stop=stop,
        logits_processors=list(logits_processors or ()), top_logprobs=top_logprobs, cache=cache,
        context=context, snapshot_at=list(snapshot_at), tools=tools,
        allow_long_prompt=allow_long_prompt, prompt_progress=prompt_progress,
        constraint=constraint, drafter=drafter, num_draft_tokens=prompt_lookup or num_draft_tokens,
    )  # fmt: skip


def run_request(
    model: Model,
    tokenizer: Any,
    request: Request,
    *,
    prefill_step_size: int | None = DEFAULT_PREFILL_STEP_SIZE,
    cancel: threading.Event | None = None,
    prompt_cache=None,
) -> Iterator[GenerationResponse]:
    """Run one request on an engine of its own; its responses as they come.

    The request is checked here (bad options raise before the first response).
    ``cancel``: once set, the answer ends within one token ("cancelled").
    Closing the iterator early ends the request too.
    """
    engine = Engine(
        model, tokenizer, max_batch=1, prefill_step_size=prefill_step_size,
        prompt_cache=prompt_cache,
    )  # fmt: skip
    rid = engine.add(request)
    return _responses(engine, rid, cancel)


def _responses(
    engine: Engine, rid: int, cancel: threading.Event | None
) -> Iterator[GenerationResponse]:
    try:
        while engine.has_work:
            if cancel is not None and cancel.is_set():
                engine.abort(rid)
            for _, response in engine.step():
                yield response
    finally:
        engine.close()


def stream_generate(
    model: Model,
    tokenizer: Any,
    prompt: Prompt,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    response_format: Any = None,
    tool_choice: Any = None,
    cache: Cache | None = None,
    prefill_step_size: int | None = DEFAULT_PREFILL_STEP_SIZE,
    cancel: threading.Event | None = None,
    **options: Any,
) -> Iterator[GenerationResponse]:
    """Generate an answer to ``prompt``, one `GenerationResponse` per sampled token.

    Args:
        prompt: text (encoded as is), token ids, or a list of chat messages
            (rendered with the checkpoint's chat template, with ``tools`` and
            ``documents``).
        response_format: structured output (`granite_mlx.constrain`): OpenAI's
            ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
            {"name", "schema"}}``, a pydantic model class, a JSON Schema dict,
            ``Regex(...)`` or ``Grammar(...)``; None or ``{"type": "text"}``: free text.
        tool_choice: with ``tools``: "required" or ``{"type": "function", "function":
            {"name": ...}}`` forces a valid call, "auto" checks a call once it
            starts, "none" forbids calls; None (default) constrains nothing.
        cache: a cache that already holds earlier tokens; ``prompt`` is then
            only what follows them (the cache is updated in place).
        max_tokens: the most tokens to sample (default 256; None: until EOS, a
            stop string or cancellation).
        temperature, top_p, top_k, min_p: sampling; temperature 0 (the
            default) is greedy.
        repetition_penalty, repetition_context_size: mlx-lm's penalty over
            the last tokens.
        seed: the request's own random seed: the same seed gives the same
            answer, alone or in a batch (None: drawn from MLX's global generator).
        stop: strings that end the answer; they are not part of the text.
        top_logprobs: also report the n most likely tokens of each step.
        prefill_step_size: prompt tokens per model call while prefilling (default
            2048 on a GPU, 256 on the CPU, where larger steps only cost memory).
        prompt_progress: called as ``prompt_progress(processed, total)``.
        cancel: a ``threading.Event``; once set, generation ends within one
            token with a final response whose finish_reason is "cancelled".
        allow_long_prompt: run prompts longer than max_position_embeddings.
        logits_processors: extra ``f(history, logits) -> logits`` callables
            (with a drafter they must be pure functions of their arguments:
            they also see drafted positions that may be rejected).
        draft_model: speculative decoding with this draft model: a `Model`, a
            ``(model, tokenizer)`` pair as `load` returns (the tokenizers are
            then compared), a checkpoint folder or repo id, or a
            `granite_mlx.speculative.Drafter`. Its vocabulary must be the
            model's. Greedy output is unchanged; sampled output keeps its
            distribution. Responses count ``drafted_tokens`` / ``accepted_tokens``.
        num_draft_tokens: tokens drafted per step (1 to 64; default 4).
        prompt_lookup: speculative decoding without a draft model: drafts of
            this many tokens copied from earlier in the prompt and answer.

    Closing the iterator also stops generation. Errors in the prompt or the
    options raise `GenerationError` (or `PromptTooLongError`) at the call.
    The final response's ``tool_calls`` lists every tool call of the answer.
    """
    ids = encode_input(tokenizer, prompt, tools, documents)
    constraint = build_constraint(tokenizer, response_format, tools, tool_choice)
    request = make_request(ids, cache=cache, tools=tools, constraint=constraint, **options)
    return run_request(
        model, tokenizer, request, prefill_step_size=prefill_step_size, cancel=cancel
    )


@dataclass
class Completion:
    """A whole answer: its text, its tool calls and how it ended."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    generation_tps: float = 0.0


def collect(responses: Iterator[GenerationResponse]) -> Completion:
    """Gather streamed responses into one `Completion`."""
    text, tokens, last = [], [], None
    for r in responses:
        text.append(r.text)
        if r.token is not None:
            tokens.append(r.token)
        last = r
    if last is None:
        return Completion("")
    return Completion(
        text="".join(text), tool_calls=list(last.tool_calls), finish_reason=last.finish_reason,
        tokens=tokens, prompt_tokens=last.prompt_tokens, cached_tokens=last.cached_tokens,
        generation_tokens=last.generation_tokens, generation_tps=last.generation_tps,
    )  # fmt: skip


def complete(model: Model, tokenizer: Any, prompt: Prompt, **options: Any) -> Completion:
    """The whole answer with its tool calls; takes `stream_generate`'s options."""
    return collect(stream_generate(model, tokenizer, prompt, **options))


def generate(model: Model, tokenizer: Any, prompt: Prompt, **options: Any) -> str:
    """The whole answer as one string; takes `stream_generate`'s options (see
    `complete` for the tool calls too)."""
    return complete(model, tokenizer, prompt, **options).text
