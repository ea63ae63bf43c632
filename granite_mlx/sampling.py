"""Sampling: the options of one request, checked, and the per-request sampler.

`SamplingParams` is what a caller sets (temperature, top-p, top-k, min-p,
repetition penalty, seed); `RowSampler` is one request's state in the engine:
its own random key (so a seeded request answers the same alone or in a batch),
its token history for the logits processors, and the filters.

For one row, from the model's logits (1, vocab) in float32:

    logits   = processors(history, logits)          repetition penalty, caller's own
    logprobs = logits - logsumexp(logits)           what responses report
    allowed  = constraint mask (structured output)  -inf elsewhere
    greedy:  token = argmax(allowed logprobs)
    else:    dist  = filters(allowed logprobs) / temperature   top-k, top-p, min-p
             token = categorical(dist, key)

`distribution` gives the exact sampling distribution, which speculative
decoding needs for its acceptance rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .errors import GenerationError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


class SamplingError(GenerationError):
    """A sampling option of the wrong type or out of its range."""


def _number(name: str, value, *, integer: bool = False) -> float:
    """`value` as a finite number, or a SamplingError naming the option."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise SamplingError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. The defaults are greedy decoding."""

    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus; 1.0: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # relative to the top token's probability; 0: off
    repetition_penalty: float | None = None  # None or 1.0: off
    repetition_context_size: int = 20
    seed: int | None = None  # None: drawn from MLX's global generator (mx.random.seed)

    def check(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise SamplingError for an option of the wrong type or range; return self."""
        if _number("temperature", self.temperature) < 0:
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < _number("top_p", self.top_p) <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if _number("top_k", self.top_k, integer=True) < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if vocab_size is not None and self.top_k > vocab_size:
            raise SamplingError(
                f"top_k is {self.top_k}, more than the vocabulary's {vocab_size} tokens; "
                "use 0 to switch top-k off."
            )
        if not 0.0 <= _number("min_p", self.min_p) < 1.0:
            raise SamplingError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty is not None:
            if _number("repetition_penalty", self.repetition_penalty) <= 0:
                raise SamplingError(
                    f"repetition_penalty must be > 0, got {self.repetition_penalty}"
                )
        if _number("repetition_context_size", self.repetition_context_size, integer=True) < 1:
            raise SamplingError(
                f"repetition_context_size must be >= 1, got {self.repetition_context_size}"
            )
        if self.seed is not None:
            seed = _number("seed", self.seed, integer=True)
            if not 0 <= seed < 2**63:
                raise SamplingError(f"seed must be in [0, 2**63), got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def repetition_penalty(penalty: float, context_size: int) -> LogitsProcessor:
    """mlx-lm's (sign-aware, multiplicative) penalty on the last `context_size` tokens."""

    def apply(history: mx.array, logits: mx.array) -> mx.array:
        if history.size == 0:
            return logits
        recent = history[-context_size:]
        picked = logits[:, recent]
        picked = mx.where(picked < 0, picked * penalty, picked / penalty)
        logits[:, recent] = picked
        return logits

    return apply


def build_processors(
    params: SamplingParams, extra: Sequence[LogitsProcessor] | None = None
) -> list[LogitsProcessor]:
    """The request's logits processors: its repetition penalty, then the caller's."""
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
        processors.append(
            repetition_penalty(params.repetition_penalty, params.repetition_context_size)
        )
    processors += list(extra or ())
    return processors


def apply_filters(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """top-k, top-p and min-p on (1, vocab) log-probabilities: -inf outside the kept set.

    Each filter keeps at least the most likely token.
    """
    vocab = logprobs.shape[-1]
    if 0 < params.top_k < vocab:
        drop = mx.argpartition(-logprobs, kth=params.top_k - 1, axis=-1)[:, params.top_k :]
        logprobs = mx.put_along_axis(logprobs, drop, mx.array(-mx.inf, logprobs.dtype), axis=-1)
    if params.top_p < 1.0:
        order = mx.argsort(-logprobs, axis=-1)
        ranked = mx.take_along_axis(logprobs, order, axis=-1)
        probs = mx.exp(ranked - mx.logsumexp(ranked, axis=-1, keepdims=True))
        before = mx.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        ranked = mx.where(before < params.top_p, ranked, -mx.inf)
        logprobs = mx.put_along_axis(logprobs, order, ranked, axis=-1)
    if params.min_p > 0.0:
        floor = logprobs.max(axis=-1, keepdims=True) + math.log(params.min_p)
        logprobs = mx.where(logprobs >= floor, logprobs, -mx.inf)
    return logprobs


def _draw_seed() -> int:
    # From MLX's global generator, so that mx.random.seed() before a call still
    # makes an unseeded request reproducible.
    return int(mx.random.randint(0, 2**31 - 1, ()).item())


class RowSampler:
    """One request's sampling state: options, random key, token history."""

    def __init__(
        self,
        params: SamplingParams,
        processors: Sequence[LogitsProcessor] = (),
        history: Sequence[int] = (),
    ):
        self.params = params
        self.processors = list(processors)
        seed = params.seed if params.seed is not None else _draw_seed()
        self._key = mx.random.key(seed)
        # Only processors read the history: without them, keep none.
        self.history = mx.array(list(history), dtype=mx.int32) if self.processors else None

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: a batch of such rows samples with one op."""
        return self.params.greedy and not self.processors

    def process(self, fed: mx.array, logits: mx.array) -> mx.array:
        """Logits (1, vocab) after the processors; `fed` is the token (1,) just fed."""
        if not self.processors:
            return logits
        self.history = mx.concatenate([self.history, fed.astype(mx.int32)])
        for processor in self.processors:
            logits = processor(self.history, logits)
        return logits

    def distribution(self, logprobs: mx.array) -> mx.array:
        """The log-probabilities (1, vocab) tokens are actually drawn from (greedy: one-hot)."""
        if self.params.greedy:
            top = mx.argmax(logprobs, axis=-1, keepdims=True)
            hot = mx.arange(logprobs.shape[-1])[None] == top
            return mx.where(hot, 0.0, -mx.inf)
        dist = apply_filters(logprobs, self.params) / self.params.temperature
        return dist - mx.logsumexp(dist, axis=-1, keepdims=True)

    def next_key(self) -> mx.array:
        self._key, key = mx.random.split(self._key)
        return key

    def sample(self, logprobs: mx.array) -> mx.array:
        """One token (1,) from (1, vocab) log-probabilities (masked ones at -inf)."""
        if self.params.greedy:
            return mx.argmax(logprobs, axis=-1)
        dist = apply_filters(logprobs, self.params) / self.params.temperature
        return mx.random.categorical(dist, axis=-1, key=self.next_key())
