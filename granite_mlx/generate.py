"""Text generation: `load`, `stream_generate`, `generate`.

The pipeline for one answer:

1. The prompt (text, token ids or chat messages) becomes token ids.
2. Prefill: every prompt token but the last goes through the model in chunks of
   `prefill_step_size`, the cache evaluated after each chunk, so memory stays
   bounded whatever the prompt length.
3. Decode: one model call per token. The call for token n+1 is queued
   (`mx.async_eval`) before token n is detokenized, so the device works while
   Python streams text.
4. `TextAssembler` turns tokens into text to show: mlx-lm's streaming
   detokenizer (never a broken UTF-8 character), stop strings (never shown, even
   when split across tokens), and tool calls (their markup never shown).

Invariant the chat session relies on: the cache always holds a prefix of
prompt + sampled tokens; `cache_length(cache)` says how long.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .cache import Cache, KVCache, cache_length, eval_cache
from .chat_format import encode_prompt
from .errors import GraniteError
from .loading import load_model, resolve_model_path
from .model import Model
from .sampling import LogitsProcessor, Sampler, build_processors, build_sampler
from .tokenizer import load_tokenizer
from .tool_calls import ParseUpdate, ToolCall, ToolCallParser

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

__all__ = [
    "GenerationError",
    "GenerationResponse",
    "PromptTooLongError",
    "TextAssembler",
    "encode_input",
    "generate",
    "load",
    "stream_from_ids",
    "stream_generate",
]

#: A prompt: raw text, token ids, or OpenAI-style chat messages.
Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]] | mx.array

DEFAULT_MAX_TOKENS = 256
DEFAULT_PREFILL_STEP_SIZE = None  # per device: see default_prefill_step_size()
GPU_PREFILL_STEP_SIZE = 2048
# On the CPU throughput is flat from 128 to 2048 tokens a step (the products are
# already large), while each step's working memory grows with it: 4-layer H-350M,
# 2K prompt, 91-102 tok/s throughout, excess over weights + KV 12% at 128,
# 14% at 256, 21% at 512, 40% at 1024, 76% at 2048 (benchmarks/results/
# prefill_step_sweep_cpu.log). So the CPU takes small steps.
CPU_PREFILL_STEP_SIZE = 256


def default_prefill_step_size() -> int:
    return CPU_PREFILL_STEP_SIZE if mx.default_device() == mx.cpu else GPU_PREFILL_STEP_SIZE


class GenerationError(GraniteError, ValueError):
    """A prompt or an option that generation cannot use."""


class PromptTooLongError(GenerationError):
    """The prompt has more tokens than the model's trained context."""


def load(
    path_or_repo_id: str | os.PathLike, dtype: str | mx.Dtype | None = None
) -> tuple[Model, TokenizerWrapper]:
    """Load a checkpoint's model and tokenizer from one folder (or Hub repo id).

    dtype: "bfloat16", "float16" or "float32" to cast the weights; None keeps
    the checkpoint's own.
    """
    folder = resolve_model_path(path_or_repo_id)
    return load_model(folder, dtype), load_tokenizer(folder)


@dataclass(slots=True)
class GenerationResponse:
    """One step of a streamed answer.

    text: new text since the previous response (may be empty while text is held
        back: an incomplete character, a possible stop-string start, a tool call).
    token / logprob: the token sampled at this step; None on a final
        "cancelled" response, which samples nothing.
    finish_reason: None while going on, then "stop" (EOS or a stop string),
        "length" (max_tokens) or "cancelled".
    tool_calls: the tool calls completed at this step (invalid ones included,
        with ``valid=False``).
    prompt_tokens / prompt_tps: tokens prefilled for this answer (only the new
        ones when a cache was passed) and their rate, up to the first token.
    generation_tokens / generation_tps: tokens sampled so far and the decode rate.
    peak_memory: MLX's peak memory so far, in GB.
    """

    text: str
    token: int | None
    logprob: float | None
    finish_reason: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0


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


def check_prompt(model: Model, ids: Sequence[int], cached: int, allow_long_prompt: bool) -> None:
    """Refuse out-of-vocabulary ids, and prompts past the trained context unless allowed."""
    vocab = model.args.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise GenerationError(
            f"Token id {bad} is outside this model's vocabulary (0..{vocab - 1})."
        )
    limit = model.args.max_position_embeddings
    total = cached + len(ids)
    if allow_long_prompt or not limit or total <= limit:
        return
    held = f" ({cached} of them already in the cache)" if cached else ""
    if model.args.position_embedding_type == "rope":
        why = "RoPE models usually degrade past their trained length"
    else:
        why = "this NoPE model has no hard position limit, but was not trained past it"
    raise PromptTooLongError(
        f"The prompt is {total} tokens{held}, longer than this model's "
        f"max_position_embeddings of {limit}. Shorten it, or pass allow_long_prompt=True "
        f"to run it anyway ({why})."
    )


# --------------------------------------------------------------------------
# Tokens -> shown text
# --------------------------------------------------------------------------


class TextAssembler:
    """Turns sampled tokens into the text to show and the tool calls made.

    Three stages, each holding back what the next token may change:
    the streaming detokenizer (incomplete UTF-8), the stop strings (a tail that
    could begin one) and the tool-call parser (a tail that could begin
    ``<tool_call>``, or an open call).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self._detokenizer = tokenizer.detokenizer
        self._stop = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._pending = ""  # text that may still turn out to start a stop string
        self._parser = ToolCallParser()
        self.stopped = False  # a stop string was found; later text is dropped

    def add(self, token: int) -> ParseUpdate:
        """Add one token (not EOS); return the text and calls it releases."""
        self._detokenizer.add_token(token)
        return self._release(self._detokenizer.last_segment, final=False)

    def finish(self) -> ParseUpdate:
        """End of generation: release everything still held back."""
        self._detokenizer.finalize()
        text, calls = self._release(self._detokenizer.last_segment, final=True)
        rest, more = self._parser.finish()
        return ParseUpdate(text + rest, calls + more)

    def _release(self, segment: str, final: bool) -> ParseUpdate:
        if self.stopped:
            return ParseUpdate("", [])
        text = self._pending + segment
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            shown, self._pending = text[:cut], ""
        elif final:
            shown, self._pending = text, ""
        else:
            keep = self._stop_prefix_length(text)
            shown, self._pending = text[: len(text) - keep], text[len(text) - keep :]
        return self._parser.feed(shown) if shown else ParseUpdate("", [])

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is the start of a stop string."""
        for n in range(min(len(text), self._longest_stop - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0


# --------------------------------------------------------------------------
# The model loop
# --------------------------------------------------------------------------


class Stepper:
    """One model call for a batch of rows: tokens (b, l) -> next token (b,) and its logprob (b,).

    Keeps each row's token history for the logits processors (repetition
    penalty, forcing, ...), which see one row at a time, as mlx-lm's do.
    """

    def __init__(
        self,
        model: Model,
        cache: Cache,
        sampler: Sampler,
        processors: Sequence[LogitsProcessor],
        history: Sequence[Sequence[int]],
    ):
        self.model, self.cache, self.sampler = model, cache, sampler
        self.processors = list(processors)
        # Only processors read the history: without them, keep none.
        self.history = [mx.array(list(h), dtype=mx.int32) for h in history] if processors else []

    def __call__(self, tokens: mx.array) -> tuple[mx.array, mx.array]:
        logits = self.model(tokens, self.cache)[:, -1, :].astype(mx.float32)  # (b, vocab)
        if self.processors:
            rows = []
            for i in range(logits.shape[0]):
                self.history[i] = mx.concatenate([self.history[i], tokens[i]])
                row = logits[i : i + 1]
                for processor in self.processors:
                    row = processor(self.history[i], row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampled = self.sampler(logprobs)  # (b,)
        return sampled, mx.take_along_axis(logprobs, sampled[:, None], axis=-1)[:, 0]


def prefill(
    model: Model,
    cache: Cache,
    tokens: mx.array,
    step_size: int | None,
    progress: Callable[[int, int], None],
    cancel: threading.Event | None,
) -> bool:
    """Feed all columns of tokens (b, l) but the last, in chunks; False if cancelled.

    The last column is left for the first decode step, whose logits give the
    first token: the prompt's own logits are never computed.
    """
    step_size = step_size or default_prefill_step_size()
    total = tokens.shape[1]
    start = cache_length(cache)
    done = 0
    progress(0, total)
    while total - done > 1:
        if cancel is not None and cancel.is_set():
            return False
        n = min(step_size, total - 1 - done)
        model(tokens[:, done : done + n], cache)  # logits unused: never evaluated
        eval_cache(cache)  # bound the graph (and memory) to one chunk
        # Room for the whole prompt at once: growing the KV cache chunk by chunk
        # would copy it each time, old and new copies alive together.
        for c in cache:
            if isinstance(c, KVCache):
                c.reserve(start + total)
        done += n
        progress(done, total)
        mx.clear_cache()
    return True


class Clock:
    """Timing for the stats of a response: prefill up to the first token, then decode."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.start = time.perf_counter()
        self.first: float | None = None
        self.prompt_tps = 0.0

    def first_token(self) -> None:
        self.first = time.perf_counter()
        self.prompt_tps = self.prompt_tokens / max(self.first - self.start, 1e-9)

    def response(
        self, text: str, token: int | None, logprob: float | None, finish: str | None,
        calls: list[ToolCall], generated: int,
    ) -> GenerationResponse:  # fmt: skip
        elapsed = time.perf_counter() - self.first if self.first is not None else 0.0
        return GenerationResponse(
            text=text,
            token=token,
            logprob=logprob,
            finish_reason=finish,
            tool_calls=calls,
            prompt_tokens=self.prompt_tokens,
            prompt_tps=self.prompt_tps,
            generation_tokens=generated,
            # The first token comes with the prefill; the rate counts the ones after it.
            generation_tps=(generated - 1) / elapsed if generated > 1 and elapsed > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
        )


def stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check_options(max_tokens: int | None, prefill_step_size: int | None) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise GenerationError(
            f"max_tokens must be at least 1 (or None for no limit), got {max_tokens}"
        )
    if prefill_step_size is not None and prefill_step_size < 1:
        raise GenerationError(f"prefill_step_size must be at least 1, got {prefill_step_size}")


def stream_from_ids(
    model: Model,
    tokenizer: Any,
    ids: Sequence[int],
    *,
    cache: Cache | None = None,
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
    on_prefilled: Callable[[], None] | None = None,
) -> Iterator[GenerationResponse]:
    """`stream_generate` for token ids; ``ids`` are the tokens not yet in ``cache``.

    ``on_prefilled`` is called once the prompt is in the cache but for its last
    token (a chat session snapshots the cache there). Options are checked
    here, before the first response is asked for.
    """
    check_options(max_tokens, prefill_step_size)
    ids = list(ids)
    if not ids:
        raise GenerationError("The prompt is empty: give at least one new token.")
    if cache is None:
        cache = model.make_cache()
    check_prompt(model, ids, cache_length(cache), allow_long_prompt)
    sampler = build_sampler(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    processors = build_processors(repetition_penalty, repetition_context_size, logits_processors)
    return _decode(
        model, tokenizer, ids, cache, sampler, seed, processors, max_tokens, stop_list(stop),
        prefill_step_size, prompt_progress or (lambda done, total: None), cancel, on_prefilled,
    )  # fmt: skip


def _decode(
    model: Model, tokenizer: Any, ids: list[int], cache: Cache, sampler: Sampler, seed: int | None,
    processors: list[LogitsProcessor], max_tokens: int | None, stop: list[str],
    step_size: int, progress: Callable[[int, int], None], cancel: threading.Event | None,
    on_prefilled: Callable[[], None] | None,
) -> Iterator[GenerationResponse]:  # fmt: skip
    clock = Clock(len(ids))
    if seed is not None:
        mx.random.seed(seed)  # here, not at the call: the stream may start later
    eos = set(tokenizer.eos_token_ids)
    text = TextAssembler(tokenizer, stop)
    tokens = mx.array(ids, dtype=mx.int32)[None]  # (1, l)
    step = Stepper(model, cache, sampler, processors, [ids[:-1]])

    if not prefill(model, cache, tokens, step_size, progress, cancel):
        shown, calls = text.finish()
        yield clock.response(shown, None, None, "cancelled", calls, 0)
        return
    if on_prefilled is not None:
        on_prefilled()
    y, logprob = step(tokens[:, -1:])
    mx.async_eval(y, logprob)

    n = 0
    while True:
        if cancel is not None and cancel.is_set():
            shown, calls = text.finish()
            yield clock.response(shown, None, None, "cancelled", calls, n)
            return
        last = max_tokens is not None and n + 1 >= max_tokens
        if not last:
            # Queue the next token's model call before this one is read out.
            next_y, next_logprob = step(y[:, None])
            mx.async_eval(next_y, next_logprob)
        token, lp = y.item(), logprob.item()
        n += 1
        if n == 1:
            clock.first_token()
            progress(len(ids), len(ids))
        if token in eos:
            shown, calls = text.finish()
            yield clock.response(shown, token, lp, "stop", calls, n)
            return
        shown, calls = text.add(token)
        if text.stopped or last:
            rest, more = text.finish()
            finish = "stop" if text.stopped else "length"
            yield clock.response(shown + rest, token, lp, finish, calls + more, n)
            return
        yield clock.response(shown, token, lp, None, calls, n)
        if n % 256 == 0:
            mx.clear_cache()
        y, logprob = next_y, next_logprob


def stream_generate(
    model: Model,
    tokenizer: Any,
    prompt: Prompt,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    cache: Cache | None = None,
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
) -> Iterator[GenerationResponse]:
    """Generate an answer to ``prompt``, one `GenerationResponse` per sampled token.

    Args:
        prompt: text (encoded as is), token ids, or a list of chat messages
            (rendered with the checkpoint's chat template, with ``tools`` and
            ``documents``).
        cache: a cache that already holds earlier tokens; ``prompt`` is then
            only what follows them (the cache is updated in place).
        max_tokens: the most tokens to sample (None: until EOS, a stop string
            or cancellation).
        temperature, top_p, top_k, min_p: sampling; temperature 0 (the
            default) is greedy.
        repetition_penalty, repetition_context_size: mlx-lm's penalty over
            the last tokens.
        seed: reseed MLX's generator first; the same seed gives the same answer.
        stop: strings that end the answer; they are not part of the text.
        prefill_step_size: prompt tokens per model call while prefilling (default
            2048 on a GPU, 256 on the CPU, where larger steps only cost memory).
        prompt_progress: called as ``prompt_progress(processed, total)``.
        cancel: a ``threading.Event``; once set, generation ends within one
            token with a final response whose finish_reason is "cancelled".
        allow_long_prompt: run prompts longer than max_position_embeddings.
        logits_processors: extra ``f(history, logits) -> logits`` callables.

    Closing the iterator also stops generation. Errors in the prompt or the
    options raise `GenerationError` (or `PromptTooLongError`) at the call.
    """
    ids = encode_input(tokenizer, prompt, tools, documents)
    return stream_from_ids(
        model, tokenizer, ids, cache=cache, max_tokens=max_tokens, temperature=temperature,
        top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size, seed=seed, stop=stop,
        prefill_step_size=prefill_step_size, prompt_progress=prompt_progress, cancel=cancel,
        allow_long_prompt=allow_long_prompt, logits_processors=logits_processors,
    )  # fmt: skip


def generate(model: Model, tokenizer: Any, prompt: Prompt, **options: Any) -> str:
    """The whole answer as one string; takes `stream_generate`'s options."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **options))
