"""Sampling options -> a sampler and logits processors, both mlx-lm's.

A sampler maps log-probabilities (b, vocab) to token ids (b,); a logits
processor maps (token history, logits (1, vocab)) to logits. Both come from
``mlx_lm.sample_utils``; this module only validates the options and picks them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx

from .errors import GraniteError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


class SamplingError(GraniteError, ValueError):
    """A sampling option out of its range."""


def build_sampler(
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
) -> Sampler:
    """A sampler for these options; temperature 0 is greedy (argmax).

    top_p 1.0, top_k 0 and min_p 0.0 switch those filters off. Sampling draws
    from MLX's global generator: seed it with ``mx.random.seed`` for
    reproducible answers.
    """
    if temperature < 0:
        raise SamplingError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise SamplingError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise SamplingError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= min_p < 1.0:
        raise SamplingError(f"min_p must be in [0, 1), got {min_p}")
    from mlx_lm.sample_utils import make_sampler  # mlx-lm imports transformers: only when used

    return make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)


def build_processors(
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    extra: Sequence[LogitsProcessor] | None = None,
) -> list[LogitsProcessor]:
    """Logits processors: mlx-lm's repetition penalty (None or 1.0: off), then ``extra``."""
    processors: list[LogitsProcessor] = []
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise SamplingError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if repetition_penalty is not None and repetition_penalty != 1.0:
        from mlx_lm.sample_utils import make_logits_processors

        processors += make_logits_processors(
            repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
        )
    processors += list(extra or ())
    return processors
