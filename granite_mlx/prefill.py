"""Prefill a prompt in chunks with bounded memory.

Each chunk runs through the model and the cache is evaluated before the next, so
the graph (and its activations) never spans more than one chunk; only the last
position's logits are computed, since a (chunk, vocab) logits matrix would be
larger than everything else the prefill holds.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from .cache import Cache, eval_cache

DEFAULT_STEP = 512  # SSD intermediates grow as step * chunk_size * heads


def prefill(
    model,
    tokens: mx.array,
    cache: Cache,
    step_size: int = DEFAULT_STEP,
    progress: Callable[[int, int], None] | None = None,
) -> mx.array:
    """Feed tokens (b, l) into `cache`; return the last position's logits (b, vocab)."""
    total = tokens.shape[1]
    if total == 0:
        raise ValueError("cannot prefill an empty prompt")
    done = 0
    h = None
    while done < total:
        n = min(step_size, total - done)
        h = model.hidden_states(tokens[:, done : done + n], cache)
        done += n
        if done < total:
            eval_cache(cache)
            mx.clear_cache()  # hand freed activation buffers back between chunks
        if progress is not None:
            progress(done, total)
    return model.logits(h[:, -1])
