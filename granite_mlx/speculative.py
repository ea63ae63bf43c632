"""Speculative decoding, exact on hybrid models: a drafter proposes k tokens, the
target checks them all in one forward pass, and its cache is set back to the last
accepted position.

One step, for a row whose cache holds the context but not its last token `last`:

1. The drafter proposes d1..dk: a draft model (its own cache, decoding one token
   at a time) or prompt lookup (the tokens that followed the latest earlier
   occurrence of the context's last n-gram; no model).
2. The target runs [last, d1..dk] in one pass: the plain multi-token forward,
   `Model.__call__`, with its Mamba2 layers recording their inputs. The logits at
   position i judge d(i+1); those at position k give one more token.
3. Acceptance. Greedy: the longest prefix of drafts equal to the target's argmax,
   then the target's own token. Sampled: d(i) is kept with probability
   min(1, p(d)/q(d)); on the first rejection the token is drawn from
   norm(max(0, p - q)); with every draft kept, from p at position k. Here p is
   exactly the distribution plain sampling draws from (`RowSampler.distribution`:
   logits processors, filters, temperature) and q the draft's (one-hot for
   prompt lookup), so every emitted token has the target's distribution.
4. Rollback. The cache must end holding [last, e1..e(r-1)] for the r emitted
   tokens: attention K/V are trimmed; each Mamba2 layer's conv window and SSM
   state after that position are rebuilt from the recorded inputs of the pass
   (`cache.rewind`, closed form `ssm.state_after`: one small product per head).
   Measured on the H-350M shape: 21-49 ms against a 288 ms decode step, where
   snapshot + replay of the kept tokens costs another forward pass (357-1652
   ms) and materialising every per-position state 456 ms
   (benchmarks/speculative.py; README, "Speculative decoding speed"). The draft
   model's cache goes back through snapshots taken after each of its one-token
   steps.

Output is token-identical to plain greedy decoding (tests/test_speculative.py
proves it against `Model.__call__`-based decoding for hybrid, dense and MoE
models) and, sampled, has the target's distribution (a chi-square test).

`Speculator` runs the steps of one answer; the engine runs a request with a
drafter through it (batch 1, its own cache), calling `Speculator.step` once per
engine step and `Speculator.keep` when the answer ends inside the tokens a step
emitted (a stop string, EOS).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .cache import Cache, can_trim, record, restore, rewind, snapshot, trim
from .errors import GenerationError
from .model import Model
from .sampling import RowSampler, SamplingParams

__all__ = [
    "DraftError",
    "DraftModel",
    "Drafter",
    "PromptLookup",
    "Proposal",
    "SpecStep",
    "Speculator",
    "make_drafter",
    "tokenizer_fingerprint",
]

MAX_DRAFT_TOKENS = 64


class DraftError(GenerationError):
    """A drafter that cannot serve this target (another vocabulary, bad options)."""


# --------------------------------------------------------------------------
# Drafters
# --------------------------------------------------------------------------


@dataclass
class Proposal:
    """Drafted tokens (m,) int32 and, when drafted by sampling, the draft's
    distribution at each of them (m, vocab); None means deterministic drafts
    (q one-hot at the drafted token)."""

    tokens: mx.array
    q: mx.array | None = None


class Drafter:
    """Proposes tokens to follow a context. It never touches the target's cache;
    what it keeps between steps (a draft model's cache) only makes it faster."""

    def check(self, model: Model, tokenizer: Any | None) -> None:
        """Raise `DraftError` if this drafter cannot serve ``model``."""

    def propose(self, context: Sequence[int], k: int, sampler: RowSampler) -> Proposal:
        """Up to k tokens to follow ``context`` (every token so far, the last
        one included, which the target has not seen yet either). A drafter that
        samples takes the request's options and random keys from ``sampler``."""
        raise NotImplementedError


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of a tokenizer's vocabulary (every token string and its id, added
    tokens included): equal for tokenizers that map text to the same ids."""
    cached = getattr(tokenizer, "_granite_fingerprint", None)
    if cached is not None:
        return cached
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    vocab = sorted(inner.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    try:
        tokenizer._granite_fingerprint = digest
    except AttributeError:
        pass
    return digest


class DraftModel(Drafter):
    """A smaller model of the same vocabulary drafting for the target.

    It keeps its own cache across steps and answers (``ids`` says which tokens
    it holds) and takes a snapshot after each one-token step, so after a
    verification it goes back to the longest prefix it shares with the target's
    tokens; only a context that diverges before its last proposal costs a new
    prefill. ``tokenizer``, when given, is compared with the target's.
    """

    def __init__(self, model: Model, tokenizer: Any | None = None):
        if not isinstance(model, Model):
            raise DraftError(
                f"draft_model must be a granite-mlx Model (from granite_mlx.load), "
                f"not {type(model).__name__}."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.cache: Cache = self.model.make_cache()
        self.ids: list[int] = []
        self._snapshots: list = []  # (length, CacheSnapshot), ascending
        self._drafted: mx.array | None = None  # fed drafts, read into ids on the next call

    def check(self, model: Model, tokenizer: Any | None) -> None:
        mine, theirs = self.model.args.vocab_size, model.args.vocab_size
        if mine != theirs:
            raise DraftError(
                f"The draft model's vocabulary has {mine} entries and the target's {theirs}: "
                "a draft model must use the target's tokenizer (for a Granite 4.0 target, "
                "another Granite 4.0 checkpoint such as ibm-granite/granite-4.0-h-350m)."
            )
        known = self.tokenizer is not None and tokenizer is not None
        if known and tokenizer_fingerprint(self.tokenizer) != tokenizer_fingerprint(tokenizer):
            raise DraftError(
                "The draft model's tokenizer differs from the target's (same vocabulary "
                "size, different tokens): a draft model must use the target's tokenizer."
            )

    def _sync(self, context: Sequence[int]) -> None:
        """Bring the cache to the longest prefix of context[:-1] it can reach."""
        if self._drafted is not None:
            self.ids += self._drafted.tolist()
            self._drafted = None
        limit = min(len(self.ids), len(context) - 1)
        common = next((i for i in range(limit) if self.ids[i] != context[i]), limit)
        if common == len(self.ids):
            return
        for length, snap in reversed(self._snapshots):
            if length <= common:
                restore(self.cache, snap)
                self.ids = self.ids[:length]
                self._snapshots = [(n, s) for n, s in self._snapshots if n <= length]
                return
        if can_trim(self.cache):
            trim(self.cache, len(self.ids) - common)
            self.ids = self.ids[:common]
            return
        self.reset()

    def propose(self, context: Sequence[int], k: int, sampler: RowSampler) -> Proposal:
        from .engine import prefill

        self._sync(context)
        pending = list(context[len(self.ids) :])
        if len(pending) > 1:  # a new prompt: in bounded chunks, as the target's
            prefill(self.model, self.cache, pending[:-1])
        self.ids = list(context)
        self._snapshots = []
        last = mx.array(pending[-1:], dtype=mx.int32)[None]  # (1, 1)
        tokens, qs = [], []
        for i in range(k):
            if i:
                self._snapshots.append((len(self.ids) + i - 1, snapshot(self.cache)))
                last = tokens[-1][None]
            logits = self.model(last, self.cache)[:, -1].astype(mx.float32)  # (1, V)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if sampler.params.greedy:
                tokens.append(mx.argmax(logprobs, axis=-1))
            else:  # q: the request's filters and temperature on the draft's logits
                log_q = sampler.distribution(logprobs)
                tokens.append(mx.random.categorical(log_q, key=sampler.next_key()))
                qs.append(mx.exp(log_q))
        drafts = mx.concatenate(tokens).astype(mx.int32)  # (k,)
        self._drafted = drafts[: k - 1]  # fed to the cache: d1 .. d(k-1)
        self._snapshots.append((len(self.ids) + k - 1, snapshot(self.cache)))
        return Proposal(drafts, mx.concatenate(qs) if qs else None)


class PromptLookup(Drafter):
    """Prompt lookup decoding: the drafts are the tokens that followed the most
    recent earlier occurrence of the context's last n tokens (n from
    ``max_ngram`` down to ``min_ngram``). No model, no cache: for answers that
    copy from their prompt (editing code, quoting documents).

    An index of every n-gram's latest position (one with at least one token
    after it) is kept and extended as the context grows.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise DraftError(
                f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}"
            )
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token

    def _extend(self, context: Sequence[int]) -> None:
        held = len(self.ids)
        if context[:held] != self.ids:
            self.reset()
            held = 0
        # Index n-grams ending at positions that have a successor: up to len - 2.
        for end in range(max(held - 1, 0), len(context) - 1):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end + 1 >= n:
                    self._index[tuple(context[end + 1 - n : end + 1])] = end
        self.ids = list(context)

    def propose(self, context: Sequence[int], k: int, sampler: RowSampler) -> Proposal:
        context = list(context)
        self._extend(context)
        drafts: list[int] = []
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            end = self._index.get(tuple(context[-n:]))
            if end is not None:
                drafts = context[end + 1 : end + 1 + k]
                break
        return Proposal(mx.array(drafts, dtype=mx.int32))


def make_drafter(draft_model: Any = None, prompt_lookup: int | None = None) -> Drafter | None:
    """The drafter for generation options: ``draft_model`` as a `Model`, a
    ``(model, tokenizer)`` pair (as `load` returns) or a checkpoint path / repo id
    (loaded with its tokenizer); or prompt lookup. Both at once is an error."""
    if prompt_lookup is not None and (
        isinstance(prompt_lookup, bool) or not isinstance(prompt_lookup, int) or prompt_lookup < 0
    ):
        raise DraftError(
            f"prompt_lookup is the number of tokens to draft (1 to {MAX_DRAFT_TOKENS}; 0 or None: "
            f"off), got {prompt_lookup!r}"
        )
    if draft_model is not None and prompt_lookup:
        raise DraftError("Use draft_model or prompt_lookup, not both.")
    if prompt_lookup:
        return PromptLookup()
    if draft_model is None or isinstance(draft_model, Drafter):
        return draft_model
    if isinstance(draft_model, Model):
        return DraftModel(draft_model)
    if isinstance(draft_model, tuple) and len(draft_model) == 2:
        return DraftModel(*draft_model)
    if not isinstance(draft_model, (str, os.PathLike)):
        raise DraftError(
            "draft_model must be a Model, a (model, tokenizer) pair or a checkpoint folder / "
            f"repo id, not {type(draft_model).__name__}."
        )
    from .generate import load

    return DraftModel(*load(draft_model, dtype=None))


def add_cli_options(parser: Any) -> None:
    """The speculative decoding flags, for the commands that generate
    (``granite-mlx generate`` and ``serve``; the chat app can add them the same way)."""
    group = parser.add_argument_group(
        "speculative decoding (same output, faster when drafts agree)"
    )
    group.add_argument(
        "--draft-model", metavar="M", default=None,
        help="a smaller checkpoint with the same tokenizer that drafts tokens (folder or repo id)",
    )  # fmt: skip
    group.add_argument(
        "--num-draft-tokens", type=int, default=4, metavar="K",
        help="tokens the draft model proposes per step (default 4)",
    )  # fmt: skip
    group.add_argument(
        "--prompt-lookup", type=int, default=None, metavar="K",
        help="draft K tokens copied from earlier in the prompt and answer (no draft model)",
    )  # fmt: skip


def cli_drafting(args: Any, dtype: str | None = None) -> dict[str, Any]:
    """`stream_generate` options from the parsed flags of `add_cli_options`; loads
    the draft model (in ``dtype``) with its tokenizer, so both are checked."""
    if args.draft_model is not None and args.prompt_lookup:
        raise DraftError("Use --draft-model or --prompt-lookup, not both.")
    if args.prompt_lookup is not None:
        make_drafter(prompt_lookup=args.prompt_lookup)  # checks the value
        check_num_draft_tokens(args.prompt_lookup)
        return {"prompt_lookup": args.prompt_lookup}
    if args.draft_model is None:
        return {}
    check_num_draft_tokens(args.num_draft_tokens)
    from .generate import load

    return {
        "draft_model": load(args.draft_model, dtype=dtype),
        "num_draft_tokens": args.num_draft_tokens,
    }


def drafter_factory(
    model: Model, tokenizer: Any, options: dict[str, Any]
) -> tuple[Callable[[], Drafter], int] | None:
    """For a server: `cli_drafting`'s options as (a maker of one fresh drafter per
    request, so each has a draft cache of its own; the number of draft tokens),
    the draft checked against ``model`` once, here. None when not drafting."""
    if not options:
        return None
    if "prompt_lookup" in options:
        return PromptLookup, options["prompt_lookup"]
    draft, draft_tokenizer = options["draft_model"]
    DraftModel(draft, draft_tokenizer).check(model, tokenizer)
    return (lambda: DraftModel(draft, draft_tokenizer)), options["num_draft_tokens"]


def check_num_draft_tokens(k: int) -> None:
    if not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise DraftError(
            f"num_draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {k}"
        )


# --------------------------------------------------------------------------
# One speculative step
# --------------------------------------------------------------------------


@dataclass
class SpecStep:
    """What one step emitted: tokens (1..k+1) with the target's logprob of each
    (after logits processors, before filters and temperature, as plain decoding
    reports it); logprob_rows (len(tokens), vocab) the target's full logprobs
    there (for top_logprobs); drafted / accepted draft counts."""

    tokens: list[int]
    logprobs: list[float]
    logprob_rows: mx.array
    drafted: int
    accepted: int


class Speculator:
    """The speculative steps of one answer, for a batch-1 cache.

    sampler: the request's `RowSampler` (options, random key, and the logits
        processors' history, which it extends with every token the cache takes).
    context: the tokens the cache holds, as far as the caller knows them (the
        drafter sees them; correctness never depends on them).
    """

    def __init__(
        self,
        model: Model,
        cache: Cache,
        drafter: Drafter,
        num_draft_tokens: int = 4,
        sampler: RowSampler | None = None,
        context: Sequence[int] = (),
    ):
        check_num_draft_tokens(num_draft_tokens)
        self.model, self.cache, self.drafter = model, cache, drafter
        self.k = num_draft_tokens
        self.sampler = sampler if sampler is not None else RowSampler(SamplingParams())
        self.context = list(context)
        self.drafted = self.accepted = 0  # totals over the answer
        # (context length before, tokens emitted, drafts accepted) of the last step
        self._last_step: tuple[int, int, int] | None = None

    def step(self, last: int, max_tokens: int | None = None) -> SpecStep:
        """Feed ``last`` plus drafts; emit 1..k+1 tokens (at most ``max_tokens``).
        The cache then holds ``last`` and every emitted token but the final one."""
        sampler = self.sampler
        k = self.k if max_tokens is None else min(self.k, max_tokens - 1)
        proposal = self.drafter.propose(self.context + [last], k, sampler) if k > 0 else None
        drafts = proposal.tokens[:k] if proposal is not None else mx.array([], dtype=mx.int32)
        m = drafts.shape[0]
        inputs = mx.concatenate([mx.array([last], dtype=mx.int32), drafts])  # (m+1,)
        if m:
            record(self.cache)
        try:
            logits = self.model(inputs[None], self.cache)[0].astype(mx.float32)  # (m+1, V)
        finally:
            record(self.cache, False)
        logprobs = self._logprobs(logits, inputs)
        if sampler.params.greedy:
            chosen = mx.argmax(logprobs, axis=-1)  # (m+1,)
            keep = drafts == chosen[:m]
        else:
            p = mx.exp(sampler.distribution(logprobs))  # (m+1, V)
            q = proposal.q if m else None
            chosen, keep = speculative_sample(p, drafts, q, key=sampler.next_key())
        picked = mx.take_along_axis(logprobs, chosen[:, None], axis=-1)[:, 0]
        draft_lp = mx.take_along_axis(logprobs[:m], drafts[:, None], axis=-1)[:, 0]
        mx.eval(chosen, keep, picked, draft_lp)
        flags = keep.tolist()
        n = next((i for i, ok in enumerate(flags) if not ok), m)  # drafts accepted
        tokens = drafts[:n].tolist() + [chosen[n].item()]
        lps = draft_lp[:n].tolist() + [picked[n].item()]
        if m > n:
            rewind(self.cache, m - n)
        before = len(self.context)
        self.context += [last] + tokens[:-1]
        if sampler.processors:
            sampler.history = mx.concatenate([sampler.history, inputs[: n + 1]])
        self.drafted += m
        self.accepted += n
        self._last_step = (before, len(tokens), n)
        return SpecStep(tokens, lps, logprobs[: n + 1], m, n)

    def keep(self, count: int) -> None:
        """Keep only the first ``count`` tokens the last step emitted (the caller
        stopped there): the cache then holds [last, e1 .. e(count-1)]."""
        if self._last_step is None:
            raise ValueError("keep() needs a step first")
        before, emitted, accepted = self._last_step
        if not 1 <= count <= emitted:
            raise ValueError(f"the last step emitted {emitted} tokens; cannot keep {count}")
        drop = emitted - count
        if drop:
            rewind(self.cache, drop)
            del self.context[before + count :]
            if self.sampler.processors:
                history = self.sampler.history
                self.sampler.history = history[: history.shape[0] - drop]
        self.accepted -= accepted - min(accepted, count)  # drafts emitted, not just verified
        self._last_step = (before, count, min(accepted, count))

    def close(self) -> None:
        """Drop what rollback kept of the last verification (a float32 state per
        Mamba2 layer); `keep` is no longer possible afterwards."""
        for c in self.cache:
            if getattr(c, "recorded", None) is not None:
                c.recorded = None
        self._last_step = None

    def _logprobs(self, logits: mx.array, inputs: mx.array) -> mx.array:
        """Target logprobs (l, V) at each position, after the logits processors,
        each seeing the history up to and including that position's input."""
        processors = self.sampler.processors
        if processors:
            rows = []
            for i in range(logits.shape[0]):
                history = mx.concatenate([self.sampler.history, inputs[: i + 1]])
                row = logits[i : i + 1]
                for processor in processors:
                    row = processor(history, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def speculative_sample(
    p: mx.array, drafts: mx.array, q: mx.array | None = None, key: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """The speculative sampling rule, on any leading batch shape.

    p: (..., m+1, V) the target's distribution at each verified position;
    drafts: (..., m) the drafted tokens; q: (..., m, V) the draft's distribution
    they were drawn from, or None for deterministic drafts (q one-hot);
    key: a random key (None: MLX's global generator).
    Returns, per position, the token to emit if the walk stops there (a draw
    from norm(max(0, p - q)) after a rejection, from p after the last draft)
    (..., m+1), and whether each draft is kept, with probability
    min(1, p(d)/q(d)) (..., m). Emitting the kept prefix and then the token at
    the first rejection gives exactly the target's distribution.
    """
    k_uniform, k_draw = mx.random.split(key) if key is not None else (None, None)
    m = drafts.shape[-1]
    if m == 0:
        return mx.random.categorical(mx.log(p), key=k_draw), mx.zeros(drafts.shape, mx.bool_)
    head = p[..., :m, :]
    if q is None:
        q = (mx.arange(p.shape[-1]) == drafts[..., None]).astype(p.dtype)
    p_d = mx.take_along_axis(head, drafts[..., None], axis=-1)[..., 0]
    q_d = mx.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = mx.random.uniform(shape=drafts.shape, key=k_uniform)
    keep = u * q_d < p_d  # u < p/q; q(d) > 0 as d ~ q
    residual = mx.maximum(head - q, 0.0)
    # A rejection implies p != q, hence residual mass; rounding can still leave
    # none where p and q agree to the last bit: fall back to p there.
    empty = residual.sum(axis=-1, keepdims=True) <= 0
    residual = mx.where(empty, head, residual)
    weights = mx.concatenate([residual, p[..., m:, :]], axis=-2)  # unnormalised is fine
    return mx.random.categorical(mx.log(weights), key=k_draw), keep
