"""The engine: one decode loop for every client.

`stream_generate`, `batch_generate`, `ChatSession`, the server and the chat app
all hand their work to an `Engine` as `Request`s and read `GenerationResponse`s
back. Each request has its own sampler (options, random key, logits processors),
stop rules, optional constraint (structured output) and cache; the engine runs
the requests that are decoding as one batch.

    engine = Engine(model, tokenizer, max_batch=8, prompt_cache=PromptCache(2**30))
    rid = engine.add(Request(prompt=ids, max_tokens=100))
    while engine.has_work:
        for rid, response in engine.step():
            ...

One `step()`:

1. Admit waiting requests while there is room: a request resumes from the cache
   it brought, or from the longest prefix the prompt cache holds (an exact
   snapshot: Mamba2 conv and SSM state plus attention K/V up to there).
2. Prefill one chunk of one admitted request, in a cache of its own (so running
   rows wait at most one chunk). Chunks end at the positions the request asked
   to snapshot (message boundaries), where the prompt cache takes a snapshot.
   Every prompt token but the last goes in: the last one is fed by the first
   decode step, whose logits give the first answer token. The cache after that
   pass goes to the prompt cache with those logits, so the same prompt again (a
   regenerated answer, another sample) starts with its first token, no pass at all.
3. Decode: rows whose prefill is done join the batch (their cache merged in,
   rows aligned on the right with left padding); one forward pass over every
   row; per row: logits processors, constraint mask (computed on the host while
   the device runs the pass), sampling.
   Rows with a drafter (speculative decoding) stay out of the batch: each runs one
   speculative step on its own cache (`speculative.Speculator`), 1..k+1 tokens.
4. Read the tokens, turn them into text (`text.TextAssembler`), end rows on EOS,
   a stop string, a finished constraint or max_tokens; retire ended rows (their
   final cache goes back to the caller's cache object and to the prompt cache).

When no row needs the host between two tokens (no constraint), the pass for
token n+1 is queued before token n is read (`mx.async_eval`), so the device
works while Python detokenizes; rows that end were fed one token too many,
which only means their cache holds that token (a cache always holds a prefix of
prompt + sampled tokens, `cache.cache_length` long).

The reference is the plain model call on one request at a time; tests prove
every row of a batch, with rows joining and leaving, answers exactly that.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from . import cache as caches
from .cache import Cache, KVCache, cache_length, eval_cache
from .errors import GenerationError, GraniteError, PromptTooLongError
from .sampling import LogitsProcessor, RowSampler, SamplingParams, build_processors
from .speculative import Drafter, Speculator, check_num_draft_tokens
from .text import TextAssembler
from .tool_calls import ToolCall

__all__ = [
    "Constraint",
    "Engine",
    "EngineShutdown",
    "EngineThread",
    "GenerationResponse",
    "QueueFullError",
    "Request",
    "RequestStream",
]

DEFAULT_MAX_TOKENS = 256
MAX_TOP_LOGPROBS = 20
GPU_PREFILL_STEP_SIZE = 2048
# On the CPU throughput is flat from 128 to 2048 tokens a step (the products are
# already large), while each step's working memory grows with it: 4-layer H-350M,
# 2K prompt, 91-102 tok/s throughout, excess over weights + KV 12% at 128,
# 14% at 256, 21% at 512, 40% at 1024, 76% at 2048 (benchmarks/results/
# prefill_step_sweep_cpu.log). So the CPU takes small steps.
CPU_PREFILL_STEP_SIZE = 256


# A snapshot point this close after where the row resumed from the prompt cache is
# skipped: taking it would cost a model pass of its own (the chunk is cut there), while
# a later request resuming from the same snapshot feeds these few tokens inside its
# own first chunk. (An append-only chat resumes at the end of the previous answer, and
# the end of that message is only its end-of-text marker and a newline further.)
MIN_SNAPSHOT_GAP = 8


def default_prefill_step_size() -> int:
    return CPU_PREFILL_STEP_SIZE if mx.default_device() == mx.cpu else GPU_PREFILL_STEP_SIZE


@dataclass(slots=True)
class GenerationResponse:
    """One sampled token of an answer (the last one says why the answer ended).

    text: new text since the previous response (may be empty while text is held
        back: an incomplete character, a possible stop-string start, a tool call).
    token / logprob: the token sampled at this step and its log-probability;
        None on a final "cancelled" response, which samples nothing.
    finish_reason: None while going on, then "stop" (EOS, a stop string or a
        finished constraint), "length" (max_tokens) or "cancelled".
    tool_calls: the tool calls completed at this step; on the final response,
        every call of the answer (invalid ones included, with ``valid=False``).
    prompt_tokens / prompt_tps: prompt tokens processed for this answer and
        their rate up to the first token; cached_tokens: prompt tokens that came
        from a cache instead (a session's or the prompt cache).
    generation_tokens / generation_tps: tokens sampled so far and the decode rate.
    top_logprobs: the most likely tokens and their log-probabilities (when asked).
    peak_memory: MLX's peak memory so far, in GB.
    drafted_tokens / accepted_tokens: speculative decoding, so far: tokens the
        drafter proposed and how many of them the model accepted (and emitted).
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
    cached_tokens: int = 0
    top_logprobs: list[tuple[int, float]] | None = None
    drafted_tokens: int = 0
    accepted_tokens: int = 0


class Constraint(Protocol):
    """Structured output: which tokens may come next (see granite_mlx.constrain)."""

    def mask(self) -> np.ndarray:
        """Allowed next tokens: bool (n,) or packed uint32 words ((n + 31) // 32,),
        bit j of word i for token 32 * i + j. Ids >= n are not allowed."""

    def advance(self, token: int) -> None:
        """The token sampled (one that mask() allowed)."""

    def is_finished(self) -> bool:
        """Nothing more may follow."""


@dataclass
class Request:
    """One answer to generate.

    prompt: token ids to feed. With ``cache``: only those the cache does not hold yet.
    cache: a cache to resume from; the engine leaves the final state in it.
    context: the tokens ``cache`` holds, when known; the prompt cache can then keep
        snapshots of this request (without a cache, the prompt alone is the context).
    snapshot_at: absolute token positions (in context + prompt) where the prompt
        cache keeps a snapshot, e.g. where each message of a chat ends.
    tools: the tools the prompt declared (names or OpenAI schemas); a tool call to
        any other name is reported invalid. None: names are not checked.
    top_logprobs: report that many most likely tokens per step (at most 20).
    prompt_progress: called as ``prompt_progress(processed, total)`` while prefilling.
    drafter: speculative decoding (granite_mlx.speculative): the row then decodes on
        its own, ``num_draft_tokens`` drafted tokens checked per model pass.
    """

    prompt: Sequence[int]
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    logits_processors: Sequence[LogitsProcessor] = ()
    top_logprobs: int = 0
    constraint: Constraint | None = None
    cache: Cache | None = None
    context: Sequence[int] | None = None
    snapshot_at: Sequence[int] = ()
    tools: Sequence[Any] | None = None
    allow_long_prompt: bool = False
    prompt_progress: Callable[[int, int], None] | None = None
    drafter: Drafter | None = None
    num_draft_tokens: int = 4

    def check(self, model) -> None:
        """Raise a GenerationError naming the first option that cannot be used."""
        prompt = self.prompt
        if isinstance(prompt, str | bytes) or not isinstance(prompt, Sequence):
            raise GenerationError("Request.prompt must be a list of token ids.")
        if not prompt:
            raise GenerationError("The prompt is empty: give at least one new token.")
        vocab = model.args.vocab_size
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int | np.integer):
                raise GenerationError(f"Token ids must be integers, got {t!r}.")
            if not 0 <= t < vocab:
                raise GenerationError(
                    f"Token id {t} is outside this model's vocabulary (0..{vocab - 1})."
                )
        m = self.max_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise GenerationError(
                f"max_tokens must be a whole number of at least 1 (or None for no limit), got {m!r}"
            )
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise GenerationError(f"stop must be a list of strings, got {self.stop!r}")
        n = self.top_logprobs
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOP_LOGPROBS:
            raise GenerationError(
                f"top_logprobs must be a whole number from 0 to {MAX_TOP_LOGPROBS}, got {n!r}"
            )
        if not isinstance(self.sampling, SamplingParams):
            raise GenerationError("Request.sampling must be a SamplingParams.")
        if self.constraint is not None:
            c = self.constraint
            if not all(callable(getattr(c, m, None)) for m in ("mask", "advance", "is_finished")):
                raise GenerationError(
                    "Request.constraint needs mask(), advance() and is_finished(); build one "
                    "with granite_mlx.constrain.build_constraint."
                )
            # A mask over ids the model cannot produce could leave no token to sample.
            n = getattr(c, "vocab_size", None)
            if n is not None and n > vocab:
                raise GenerationError(
                    f"The constraint covers {n} token ids but the model has {vocab}: build it "
                    "with this checkpoint's own tokenizer."
                )
        self.sampling.check(vocab)
        if self.cache is not None and len(self.cache) != len(model.layers):
            raise GenerationError(
                f"The cache has {len(self.cache)} layers and the model {len(model.layers)}: "
                "pass a cache made by this model's make_cache()."
            )
        if self.context is not None and self.cache is not None:
            if len(self.context) != cache_length(self.cache):
                raise GenerationError(
                    f"Request.context has {len(self.context)} tokens but the cache holds "
                    f"{cache_length(self.cache)}."
                )
        held = cache_length(self.cache) if self.cache is not None else 0
        check_length(model, held + len(prompt), held, self.allow_long_prompt)
        if self.drafter is not None:
            if not isinstance(self.drafter, Drafter):
                raise GenerationError(
                    "Request.drafter must be a granite_mlx.speculative.Drafter (DraftModel, "
                    f"PromptLookup), not {type(self.drafter).__name__}."
                )
            if self.constraint is not None:
                raise GenerationError(
                    "Speculative decoding cannot be combined with a constraint (structured "
                    "output): drop the drafter or the constraint."
                )
            check_num_draft_tokens(self.num_draft_tokens)
            self.drafter.check(model, None)


def check_length(model, total: int, cached: int, allow_long_prompt: bool) -> None:
    """Refuse prompts past the trained context unless allowed."""
    limit = model.args.max_position_embeddings
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


def feed(model, cache: Cache, tokens: Sequence[int], total: int) -> None:
    """Prefill one chunk into a one-row cache that will hold `total` tokens."""
    model(mx.array(tokens, dtype=mx.int32)[None], cache)  # logits unused: never evaluated
    eval_cache(cache)  # bound the graph (and memory) to one chunk
    # Room for the whole prompt at once: growing the K/V chunk by chunk would copy
    # it each time, old and new copies alive together.
    for c in cache:
        if isinstance(c, KVCache):
            c.reserve(total)
    mx.clear_cache()


def prefill(model, cache: Cache, tokens: Sequence[int], step_size: int | None = None) -> None:
    """Feed `tokens` into a one-row cache in chunks, as the engine does (benchmarks use it)."""
    step_size = step_size or default_prefill_step_size()
    total = cache_length(cache) + len(tokens)
    for i in range(0, len(tokens), step_size):
        feed(model, cache, tokens[i : i + step_size], total)


# --------------------------------------------------------------------------
# One request inside the engine
# --------------------------------------------------------------------------


class _Row:
    """A request's state: its tokens, cache (until it joins the batch), sampler, text."""

    def __init__(self, rid: int, request: Request, sampler: RowSampler, text: TextAssembler):
        self.rid = rid
        self.request = request
        self.sampler = sampler
        self.text = text
        self.constraint = request.constraint
        held = cache_length(request.cache) if request.cache is not None else 0
        context = list(request.context) if request.context is not None else None
        if held == 0:
            context = []
        # The absolute token ids (what the cache holds, then the prompt). A cache whose
        # tokens the caller did not give is never indexed, and -1 stands for them.
        self.indexable = context is not None
        self.ids: list[int] = (context if context is not None else [-1] * held) + [
            int(t) for t in request.prompt
        ]
        self.prompt_end = len(self.ids)
        self.cache: Cache | None = None
        self.pos = 0  # tokens of ids in the cache (while prefilling)
        self.cached = 0  # tokens already in a cache when the request started
        self.n = 0  # tokens emitted
        self.last: int | None = None  # the token to feed next, when known on the host
        self.calls: list[ToolCall] = []
        self.aborted = False
        self.started = time.perf_counter()
        self.first_at: float | None = None
        self.prompt_tps = 0.0
        self.speculator: Speculator | None = None  # with a drafter, once prefilled
        # A prompt cache hit on the whole prompt: the logits after it, so the first
        # token needs no model pass.
        self.first_logits: mx.array | None = None
        # The batch's cache layers right after the pass that fed the prompt's last token,
        # the row's index there and its logits: for the prompt cache, once read.
        self.after_prompt: tuple[Cache, int, mx.array] | None = None

    @property
    def pipelinable(self) -> bool:
        """Can the pass for its next token be queued before its current one is read?"""
        return self.constraint is None

    def last_is_due(self, count: int) -> bool:
        m = self.request.max_tokens
        return m is not None and count >= m

    def progress(self, done: int) -> None:
        if self.request.prompt_progress is not None:
            self.request.prompt_progress(done, self.prompt_end - self.cached)

    def response(
        self, text: str, token: int | None, logprob: float | None, finish: str | None,
        calls: list[ToolCall], top: list[tuple[int, float]] | None = None,
    ) -> GenerationResponse:  # fmt: skip
        now = time.perf_counter()
        if self.first_at is None and token is not None:
            self.first_at = now
            prompt = self.prompt_end - self.cached
            self.prompt_tps = prompt / max(now - self.started, 1e-9)
        self.calls += calls
        elapsed = now - self.first_at if self.first_at is not None else 0.0
        return GenerationResponse(
            text=text,
            token=token,
            logprob=logprob,
            finish_reason=finish,
            tool_calls=list(self.calls) if finish is not None else calls,
            prompt_tokens=self.prompt_end - self.cached,
            prompt_tps=self.prompt_tps,
            # The first token comes with the prefill; the rate counts the ones after it.
            generation_tps=(self.n - 1) / elapsed if self.n > 1 and elapsed > 0 else 0.0,
            generation_tokens=self.n,
            peak_memory=mx.get_peak_memory() / 1e9,
            cached_tokens=self.cached,
            top_logprobs=top,
            drafted_tokens=self.speculator.drafted if self.speculator else 0,
            accepted_tokens=self.speculator.accepted if self.speculator else 0,
        )


@dataclass
class _Sampled:
    """The lazily computed next tokens of the batch rows (in batch order)."""

    tokens: mx.array  # (b,)
    logprobs: mx.array  # (b,)
    tops: list[tuple[mx.array, mx.array] | None]  # per row: (ids, logprobs) of the best n

    def take(self, rows: list[int]) -> _Sampled:
        idx = mx.array(rows, dtype=mx.int32)
        return _Sampled(self.tokens[idx], self.logprobs[idx], [self.tops[i] for i in rows])


def _best_first(top: tuple[mx.array, mx.array] | None) -> list[tuple[int, float]] | None:
    """A row's top_logprobs (ids, logprobs), read to the host, most likely first."""
    if top is None:
        return None
    return sorted(zip(top[0].tolist(), top[1].tolist()), key=lambda p: -p[1])


def _mask_array(mask: np.ndarray, vocab: int) -> mx.array:
    """A constraint's mask as a bool (1, vocab) array."""
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        words = m.astype(np.uint32, copy=False).astype("<u4", copy=False)
        m = np.unpackbits(words.view(np.uint8), bitorder="little").astype(np.bool_)
    out = np.zeros(vocab, np.bool_)
    n = min(vocab, m.shape[0])
    out[:n] = m[:n]
    return mx.array(out)[None]


# --------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------


class Engine:
    """Steps a batch of requests; see the module docstring.

    Not thread-safe: one thread calls add/step/abort (see `EngineThread`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 8,
        prompt_cache=None,
        prefill_step_size: int | None = None,
    ):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise GenerationError(f"max_batch must be a whole number >= 1, got {max_batch!r}")
        if prefill_step_size is not None and (
            isinstance(prefill_step_size, bool)
            or not isinstance(prefill_step_size, int)
            or prefill_step_size < 1
        ):
            raise GenerationError(
                f"prefill_step_size must be a whole number >= 1, got {prefill_step_size!r}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prompt_cache = prompt_cache
        self.prefill_step_size = prefill_step_size or default_prefill_step_size()
        self._eos = set(tokenizer.eos_token_ids)
        self._next_id = 0
        self._rows: dict[int, _Row] = {}
        self._waiting: deque[_Row] = deque()
        self._prefilling: deque[_Row] = deque()
        self._ready: list[_Row] = []  # prefilled, joining the batch at the next decode
        self._batch: list[_Row] = []  # decoding, in the batch cache's row order
        self._drafting: list[_Row] = []  # decoding speculatively, each on its own cache
        self._cache: Cache | None = None  # the batch's cache
        self._inflight: _Sampled | None = None  # next tokens of the batch rows, not yet read
        self._steps = 0
        self._to_record: list[tuple[list[int], Cache, int, mx.array]] = []

    # --- the clients' side -------------------------------------------------------------

    def add(self, request: Request) -> int:
        """Queue a request; returns its id. Bad options raise here, not mid-stream."""
        request.check(self.model)
        if request.drafter is not None:
            request.drafter.check(self.model, self.tokenizer)  # the tokenizers too
        processors = build_processors(request.sampling, request.logits_processors)
        history = list(request.context or []) + list(request.prompt[:-1])
        sampler = RowSampler(request.sampling, processors, history)
        rid = self._next_id
        self._next_id += 1
        text = TextAssembler(self.tokenizer, request.stop, request.tools)
        row = _Row(rid, request, sampler, text)
        self._rows[rid] = row
        self._waiting.append(row)
        return rid

    def abort(self, rid: int) -> None:
        """End a request at the next step with finish_reason "cancelled"."""
        row = self._rows.get(rid)
        if row is not None:
            row.aborted = True

    @property
    def has_work(self) -> bool:
        return bool(self._rows)

    @property
    def load(self) -> tuple[int, int]:
        """(requests running, requests waiting)."""
        return len(self._rows) - len(self._waiting), len(self._waiting)

    def generate(self, request: Request) -> Iterator[GenerationResponse]:
        """Add one request and step until it ends: its responses, in order.

        Closing the iterator early ends the request (its cache keeps what was fed)."""
        rid = self.add(request)
        return self._drive(rid)

    def _drive(self, rid: int) -> Iterator[GenerationResponse]:
        try:
            while rid in self._rows:
                for owner, response in self.step():
                    if owner == rid:
                        yield response
        finally:
            if rid in self._rows:
                self.abort(rid)
                while rid in self._rows:
                    self.step()

    def close(self) -> None:
        """End every request now (each cache keeps what was fed)."""
        for rid in list(self._rows):
            self.abort(rid)
        while self._rows:
            self.step()

    # --- one step ------------------------------------------------------------------------

    def step(self) -> list[tuple[int, GenerationResponse]]:
        """Admit, prefill one chunk, decode one token for every running row."""
        events: list[tuple[int, GenerationResponse]] = []
        self._record_prompt_ends()
        self._drop_aborted_before_decode(events)
        self._admit()
        if self._prefill_chunk(events):
            # A first token came from the prompt cache's logits: out with it now, before
            # a model pass (the running rows wait only for this step's bookkeeping).
            self._steps += 1
            return events
        self._decode(events)
        self._speculate(events)
        self._steps += 1
        if self._steps % 256 == 0:
            mx.clear_cache()
        return events

    def _record_prompt_ends(self) -> None:
        """Give the prompt cache the caches after whole prompts, with their logits (taken
        when each first token was read, kept until now so that the token went out
        first). The copies are queued, not waited for: a pass may be running."""
        for ids, batch, i, logits in self._to_record:
            self.prompt_cache.insert(ids, caches.row(batch, i), logits, wait=False)
        self._to_record.clear()

    def _finish(self, row: _Row, reason: str, events: list) -> None:
        """End a row that samples nothing more (cancelled)."""
        shown, calls = row.text.finish()
        events.append((row.rid, row.response(shown, None, None, reason, calls)))
        self._rows.pop(row.rid, None)

    def _drop_aborted_before_decode(self, events: list) -> None:
        for queue_ in (self._waiting, self._prefilling):
            for row in [r for r in queue_ if r.aborted]:
                queue_.remove(row)
                if row.cache is not None:
                    self._keep(row, row.cache)
                self._finish(row, "cancelled", events)
        for row in [r for r in self._ready if r.aborted]:
            self._ready.remove(row)
            self._keep(row, row.cache)
            self._finish(row, "cancelled", events)

    # --- admission and prefill ---------------------------------------------------------

    def _admit(self) -> None:
        running = len(self._batch) + len(self._ready) + len(self._prefilling)
        running += len(self._drafting)
        while self._waiting and running < self.max_batch:
            row = self._waiting.popleft()
            self._open_cache(row)
            self._prefilling.append(row)
            running += 1

    def _open_cache(self, row: _Row) -> None:
        """The row's cache: the caller's, the prompt cache's longest prefix, or new."""
        request = row.request
        cache = request.cache if request.cache is not None else self.model.make_cache()
        held = cache_length(cache)
        if held == 0 and self.prompt_cache is not None:
            whole = self.prompt_cache.lookup_whole(row.ids)
            if whole is not None:  # this very prompt before: its logits are known
                snapshot, row.first_logits = whole
                caches.assign(cache, snapshot)
                held = len(row.ids)
            # Otherwise at least the last prompt token stays to feed: its logits give
            # the answer.
            elif found := self.prompt_cache.lookup(row.ids, limit=len(row.ids) - 1):
                length, snapshot = found
                caches.assign(cache, snapshot)
                held = length
        row.cache = cache
        row.pos = row.cached = held
        row.progress(0)

    def _prefill_chunk(self, events: list) -> bool:
        """Feed one chunk of the first admitted row's prompt (all of it but the last
        token). True when instead its first token came from recorded logits."""
        if not self._prefilling:
            return False
        row = self._prefilling[0]
        end = len(row.ids) - 1
        if row.pos < end:
            stop = min(end, row.pos + self.prefill_step_size)
            marks = [
                q for q in row.request.snapshot_at
                if row.pos < q < stop and (row.cached == 0 or q - row.cached >= MIN_SNAPSHOT_GAP)
            ]  # fmt: skip
            stop = min(marks, default=stop)
            feed(self.model, row.cache, row.ids[row.pos : stop], len(row.ids))
            row.pos = stop
            row.progress(row.pos - row.cached)
            if stop in row.request.snapshot_at:
                self._keep(row, row.cache)
        if row.pos >= end:
            self._prefilling.popleft()
            caches.allocate(row.cache, self.model)
            if row.first_logits is not None:
                # The whole prompt was in the prompt cache: the first token comes from
                # the logits recorded there, no model pass.
                if self._first_token(row, events):
                    self._rows.pop(row.rid, None)  # it ends there; its cache holds the prompt
                    return True
            else:
                # Where a regenerate resumes when the logits after the prompt are not
                # recorded (a drafting row, a saved session): one token to feed.
                self._keep(row, row.cache)
                row.last = row.ids[-1]
            if row.request.drafter is None:
                self._ready.append(row)
            else:
                known = row.ids if row.indexable else row.ids[row.cached :]
                row.speculator = Speculator(
                    self.model, row.cache, row.request.drafter, row.request.num_draft_tokens,
                    row.sampler, context=known[:-1],
                )  # fmt: skip
                self._drafting.append(row)
            return row.first_logits is not None
        return False

    def _first_token(self, row: _Row, events: list) -> bool:
        """Sample and emit a row's first token from its recorded logits; True if it ends."""
        logits = row.first_logits
        mask = None
        if row.constraint is not None:
            mask = _mask_array(row.constraint.mask(), logits.shape[-1])
        last = mx.array([row.ids[-1]], dtype=mx.int32)
        token, lp, top = self._sample(row, last, logits, mask)
        return self._emit(row, token.item(), lp.item(), _best_first(top), events)

    def _keep(self, row: _Row, cache: Cache) -> None:
        """Offer the row's cache (exact for row.ids[:its length]) to the prompt cache."""
        if self.prompt_cache is None or not row.indexable:
            return
        n = cache_length(cache)
        if n > 0:
            self.prompt_cache.insert(row.ids[:n], cache)

    # --- speculative rows -----------------------------------------------------------------

    def _speculate(self, events: list) -> None:
        """One speculative step for each row with a drafter: 1..k+1 tokens each."""
        for row in list(self._drafting):
            if row.aborted:
                self._retire_drafting(row)
                self._finish(row, "cancelled", events)
                continue
            m = row.request.max_tokens
            step = row.speculator.step(row.last, None if m is None else m - row.n)
            n = row.request.top_logprobs
            tops = None
            if n:
                best = mx.argpartition(-step.logprob_rows, kth=n - 1, axis=-1)[:, :n]
                values = mx.take_along_axis(step.logprob_rows, best, axis=-1)
                tops = [
                    sorted(zip(ids, lps), key=lambda p: -p[1])
                    for ids, lps in zip(best.tolist(), values.tolist())
                ]
            for i, (token, lp) in enumerate(zip(step.tokens, step.logprobs)):
                if self._emit(row, token, lp, tops[i] if tops else None, events):
                    # The answer ends inside this step: the cache keeps only its tokens.
                    row.speculator.keep(i + 1)
                    events[-1][1].accepted_tokens = row.speculator.accepted
                    self._retire_drafting(row)
                    break

    def _retire_drafting(self, row: _Row) -> None:
        row.speculator.close()
        self._drafting.remove(row)
        self._keep(row, row.cache)
        self._rows.pop(row.rid, None)

    # --- decoding -------------------------------------------------------------------------

    def _decode(self, events: list) -> None:
        joins, self._ready = self._ready, []
        rows = self._batch
        if not rows and not joins:
            return
        aborted = any(r.aborted for r in rows)
        old = self._inflight
        # Queuing the next pass first delays reading this one by the time it takes to
        # queue (on a CPU nearly the whole pass: MLX caps the tasks in flight), so not
        # while a row waits for its first token.
        first = any(r.n == 0 for r in rows)
        if (
            old is not None
            and not aborted
            and not first
            and all(r.pipelinable for r in rows + joins)
        ):
            # Queue the next pass before reading this one. A row whose in-flight token
            # is its last (max_tokens) is not fed again.
            feed = [i for i, r in enumerate(rows) if not r.last_is_due(r.n + 1)]
            if len(feed) == len(rows):
                inputs = old.tokens
            else:
                inputs = old.tokens[mx.array(feed, dtype=mx.int32)] if feed else None
            self._retire([i for i in range(len(rows)) if i not in feed], keep_rows=feed)
            if joins:
                host = mx.array([r.last for r in joins], dtype=mx.int32)
                inputs = host if inputs is None else mx.concatenate([inputs, host])
                self._join(joins)
            fed_rows = list(self._batch)
            self._inflight = self._launch(inputs) if fed_rows else None
            ended = self._read(rows, old, events)
            gone = [i for i, r in enumerate(fed_rows) if r.rid in ended]
            if gone:
                keep = [i for i in range(len(fed_rows)) if i not in gone]
                self._retire(gone, keep_rows=keep)
                if self._inflight is not None:
                    self._inflight = self._inflight.take(keep) if keep else None
            return
        # The host decides between two tokens: read, then queue the next pass.
        ended: set[int] = set()
        if old is not None:
            # An aborted row's in-flight token is dropped: it was never fed, and
            # the answer ends without it.
            live = [i for i, r in enumerate(rows) if not r.aborted]
            if live:
                ended = self._read([rows[i] for i in live], old.take(live), events)
        for row in rows:
            if row.aborted:
                self._cancel_in_batch(row, events)
        gone = [i for i, r in enumerate(rows) if r.rid in ended or r.aborted]
        if gone:
            self._retire(gone, keep_rows=[i for i in range(len(rows)) if i not in gone])
        if first and old is not None:
            # A first token was just read: out with it now; the next pass is queued at
            # the next step (queuing it here would hold the token back as long).
            self._ready = joins + self._ready
            self._inflight = None
            return
        self._join(joins)
        if self._batch:
            inputs = mx.array([r.last for r in self._batch], dtype=mx.int32)
            self._inflight = self._launch(inputs)
        else:
            self._inflight = None

    def _cancel_in_batch(self, row: _Row, events: list) -> None:
        shown, calls = row.text.finish()
        events.append((row.rid, row.response(shown, None, None, "cancelled", calls)))

    def _join(self, joins: list[_Row]) -> None:
        for row in joins:
            if self._cache is None:
                self._cache = row.cache  # alone: the row's own cache objects, no copy
            else:
                self._cache = caches.merge(self._cache, row.cache)
            self._batch.append(row)
            row.cache = None

    def _retire(self, gone: list[int], keep_rows: list[int]) -> None:
        """Take rows out of the batch; their final cache goes to the caller's cache object
        and to the prompt cache."""
        if not gone:
            return
        rows = self._batch
        for i in gone:
            row = rows[i]
            alone = len(rows) == 1 and self._cache[0].left_padding is None
            own = self._cache if alone else caches.row(self._cache, i)
            if row.request.cache is not None and own is not row.request.cache:
                caches.assign(row.request.cache, own)
            self._keep(row, own)
            self._rows.pop(row.rid, None)
        if keep_rows:
            self._cache = caches.take(self._cache, keep_rows)
            self._batch = [rows[i] for i in keep_rows]
        else:
            self._cache, self._batch = None, []

    def _launch(self, inputs: mx.array) -> _Sampled:
        """One forward pass over the batch rows and their sampling, queued (lazy)."""
        rows = self._batch
        logits = self.model(inputs[:, None], self._cache)[:, -1].astype(mx.float32)  # (b, V)
        if self.prompt_cache is not None:
            for i, r in enumerate(rows):
                if r.n == 0 and r.indexable and r.first_logits is None and r.after_prompt is None:
                    # This pass fed the prompt's last token: the cache now holds the
                    # whole prompt. Only references here (the next pass may be queued
                    # before this one is read); recorded after the token is out.
                    r.after_prompt = (caches.layers(self._cache), i, logits[i : i + 1])
        if all(r.sampler.plain_greedy and r.constraint is None and not r.request.top_logprobs
               for r in rows):  # fmt: skip
            tokens = mx.argmax(logits, axis=-1)
            logprobs = mx.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - mx.logsumexp(
                logits, axis=-1
            )
            out = _Sampled(tokens, logprobs, [None] * len(rows))
            mx.async_eval(out.tokens, out.logprobs)
            return out
        masks: dict[int, mx.array] = {}
        if any(r.constraint is not None for r in rows):
            mx.async_eval(logits)  # the device computes while the host builds the masks
            for i, r in enumerate(rows):
                if r.constraint is not None:
                    masks[i] = _mask_array(r.constraint.mask(), logits.shape[-1])
        tokens, lps, tops = [], [], []
        for i, r in enumerate(rows):
            token, lp, top = self._sample(r, inputs[i : i + 1], logits[i : i + 1], masks.get(i))
            tokens.append(token)
            lps.append(lp)
            tops.append(top)
        out = _Sampled(mx.concatenate(tokens), mx.concatenate(lps), tops)
        mx.async_eval(out.tokens, out.logprobs, *[a for t in tops if t for a in t])
        return out

    @staticmethod
    def _sample(r: _Row, last: mx.array, logits: mx.array, mask: mx.array | None):
        """One row's next token from its (1, vocab) logits, lazily: (token (1,), its
        logprob (1,), the best top_logprobs (ids, logprobs) or None)."""
        row_logits = r.sampler.process(last, logits)
        lp = row_logits - mx.logsumexp(row_logits, axis=-1, keepdims=True)
        allowed = mx.where(mask, lp, -mx.inf) if mask is not None else lp
        token = r.sampler.sample(allowed)
        top = None
        if n := r.request.top_logprobs:
            best = mx.argpartition(-lp[0], kth=n - 1)[:n]
            top = (best, lp[0, best])
        return token, mx.take_along_axis(lp, token[:, None], axis=-1)[:, 0], top

    def _read(self, rows: list[_Row], sampled: _Sampled, events: list) -> set[int]:
        """Emit the sampled tokens of `rows`; returns the ids of rows that ended."""
        tokens, logprobs = sampled.tokens.tolist(), sampled.logprobs.tolist()
        ended: set[int] = set()
        for row, token, lp, top in zip(rows, tokens, logprobs, sampled.tops):
            if self._emit(row, token, lp, _best_first(top), events):
                ended.add(row.rid)
        return ended

    def _emit(self, row: _Row, token: int, lp: float, top, events: list) -> bool:
        """One sampled token of a row; True when the row ends with it."""
        row.n += 1
        row.ids.append(token)
        row.last = token
        if row.n == 1:
            row.progress(row.prompt_end - row.cached)  # the last prompt token is in
            if row.after_prompt is not None:
                self._to_record.append((row.ids[: row.prompt_end], *row.after_prompt))
                row.after_prompt = None
        finish = None
        if token in self._eos:
            shown, calls = row.text.finish()
            finish = "stop"
        else:
            shown, calls = row.text.add(token)
            if row.constraint is not None:
                row.constraint.advance(token)
                if row.constraint.is_finished():
                    finish = "stop"
            if row.text.stopped:
                finish = "stop"
            elif finish is None and row.last_is_due(row.n):
                finish = "length"
            if finish is not None:
                rest, more = row.text.finish()
                shown, calls = shown + rest, calls + more
        events.append((row.rid, row.response(shown, token, lp, finish, calls, top)))
        return finish is not None


# --------------------------------------------------------------------------
# One thread owns MLX: the engine for servers and apps
# --------------------------------------------------------------------------


class QueueFullError(GraniteError):
    """Too many requests are waiting; try again later."""


class EngineShutdown(GraniteError):
    """The engine stopped (shut down, or failed) before this request ended."""


_END = object()


class RequestStream:
    """The responses of one submitted request, iterable from any thread or asyncio.

    Iterating ends after the final response; if the engine stops first, iteration
    raises EngineShutdown.
    """

    def __init__(self, owner: EngineThread, request: Request):
        self._owner = owner
        self.request = request
        self.rid: int | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async: asyncio.Queue | None = None
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
            self._async = asyncio.Queue()
        self.final: GenerationResponse | None = None
        self.cancelled = False

    def _push(self, item: Any) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
        else:
            self._queue.put(item)

    def cancel(self) -> None:
        """Abort the request; the stream then ends with a "cancelled" response."""
        if not self.cancelled:
            self.cancelled = True
            self._owner._post(("abort", self))

    def _unpack(self, item: Any) -> GenerationResponse:
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[GenerationResponse]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            yield self._unpack(item)

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        if self._async is None:
            raise RuntimeError("this stream was submitted outside an event loop; iterate it")
        while True:
            item = await self._async.get()
            if item is _END:
                return
            yield self._unpack(item)


class EngineThread:
    """An `Engine` on a thread of its own (MLX arrays belong to the thread that runs them).

    `submit` is thread-safe and validates the request at once; the engine thread
    admits it at its next step. ``load`` builds (model, tokenizer) on that thread
    (give it instead of model/tokenizer to load there).

    ``engine_class``: another `Engine` (granite_mlx.parallel's `LockstepEngine`, whose
    every step the other ranks of a distributed run replay). With ``heartbeat`` set,
    an idle engine still steps that often (the other ranks' watchdogs see the run is
    alive). A step that fails ends the requests running; the engine is rebuilt and
    goes on, unless ``recover`` is False (the other ranks could not follow a rebuilt
    one): then the thread stops, and every request fails with EngineShutdown.
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        *,
        load: Callable[[], tuple[Any, Any]] | None = None,
        max_queue: int = 64,
        name: str = "granite-engine",
        engine_class: type[Engine] | None = None,
        heartbeat: float | None = None,
        recover: bool = True,
        **engine_options: Any,
    ):
        self.model, self.tokenizer = model, tokenizer
        self._engine_class = engine_class or Engine
        self._heartbeat, self._recover = heartbeat, recover
        self.max_queue = max_queue
        self._engine_options = engine_options
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, RequestStream] = {}
        self._pending = 0  # submitted, not yet admitted by the engine thread
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.engine: Engine | None = None
        self._thread = threading.Thread(target=self._run, args=(load,), name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    # --- any thread ----------------------------------------------------------------------

    def submit(self, request: Request) -> RequestStream:
        if self._stopped.is_set():
            raise EngineShutdown("The engine has stopped.")
        request.check(self.model)
        stream = RequestStream(self, request)
        with self._lock:
            waiting = self._pending + (self.engine.load[1] if self.engine else 0)
            if waiting >= self.max_queue:
                raise QueueFullError(
                    f"{waiting} requests are already waiting (the limit is {self.max_queue}); "
                    "retry shortly."
                )
            self._pending += 1
        self._post(("add", stream))
        return stream

    @property
    def load(self) -> tuple[int, int]:
        """(requests running, requests waiting)."""
        running, waiting = self.engine.load if self.engine else (0, 0)
        return running, waiting + self._pending

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop: streams still running end with EngineShutdown."""
        self._post(("stop", None))
        self._thread.join(timeout)

    def _post(self, message: tuple) -> None:
        self._inbox.put(message)

    # --- the engine thread ---------------------------------------------------------------

    def _run(self, load) -> None:
        try:
            if load is not None:
                self.model, self.tokenizer = load()
            self.engine = self._engine_class(self.model, self.tokenizer, **self._engine_options)
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's caller
            self._load_error = exc
            self._stopped.set()
            self._ready.set()
            return
        self._ready.set()
        engine = self.engine
        while True:
            idle = not engine.has_work
            try:
                message = self._inbox.get(block=idle, timeout=self._heartbeat if idle else None)
            except queue.Empty:
                message = None
            while message is not None:
                if not self._handle(message):
                    self._stop(EngineShutdown("The engine is shutting down."))
                    return
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    message = None
            if not engine.has_work and self._heartbeat is None:
                continue
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    message = None
            try:
                events = engine.step()
            except Exception as exc:  # noqa: BLE001 - fail the running requests, keep serving
                error = EngineShutdown(f"Generation failed: {type(exc).__name__}: {exc}")
                if not self._recover:
                    self._stop(error, release=False)
                    return
                self._fail_all(error, queued=False)
                self.engine = engine = self._engine_class(
                    self.model, self.tokenizer, **self._engine_options
                )
                continue
            for rid, response in events:
                stream = self._streams.get(rid)
                if stream is None:
                    continue
                stream._push(response)
                if response.finish_reason is not None:
                    stream.final = response
                    stream._push(_END)
                    del self._streams[rid]

    def _handle(self, message: tuple) -> bool:
        kind, stream = message
        if kind == "stop":
            return False
        if kind == "add":
            # Under the lock that submit counts under: between `_pending -= 1` and the
            # engine's own queue growing, a submit would see one request too few
            # waiting and let one more in past max_queue.
            with self._lock:
                self._pending -= 1
                try:
                    stream.rid = self.engine.add(stream.request)
                except Exception as exc:  # noqa: BLE001 - checked at submit; the engine may differ
                    stream._push(exc)
                    stream._push(_END)
                    return True
            self._streams[stream.rid] = stream
            if stream.cancelled:  # cancelled before the engine saw it
                self.engine.abort(stream.rid)
        elif kind == "abort" and stream.rid is not None:
            self.engine.abort(stream.rid)
        return True

    def _stop(self, error: BaseException, release: bool = True) -> None:
        self._stopped.set()
        self._fail_all(error, queued=True)
        if release and hasattr(self.engine, "shutdown"):
            with contextlib.suppress(Exception):  # the other ranks may be gone already
                self.engine.shutdown()  # a LockstepEngine lets the other ranks return
        # A thread must destroy its own MLX streams before the process exits, or the
        # exit may abort ("terminate called without an active exception").
        mx.synchronize()
        mx.clear_streams()

    def _fail_all(self, error: BaseException, queued: bool) -> None:
        """End every running stream (and with `queued`, every submitted one) with `error`."""
        for stream in self._streams.values():
            stream._push(error)
            stream._push(_END)
        self._streams.clear()
        while queued:
            try:
                kind, stream = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                with self._lock:
                    self._pending -= 1
                stream._push(error)
                stream._push(_END)
