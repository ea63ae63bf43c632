"""Per-layer caches for the hybrid decoder.

`KVCache` holds an attention layer's keys and values; `MambaCache` a Mamba2
layer's conv window and SSM state. Both take any number of tokens per call.

Snapshots are cheap: a Mamba2 state has a fixed size and every update makes new
arrays (the old ones are never written), so a snapshot keeps references; a
KV snapshot is just the length, since positions before it are never rewritten.
Only the attention part can be trimmed: a recurrent state cannot be rewound,
which is what snapshots are for. The one exception is `rewind`, used by
speculative decoding: a Mamba2 layer told to `record` keeps the inputs of its
next multi-token call, from which the state after any of its positions follows
exactly (`ssm.state_after`), so the last call can be partly undone.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import ssm
from .errors import CheckpointError

_GROW = 256  # KV capacity grows in steps of this many positions


def _padding(left_padding) -> mx.array | None:
    if left_padding is None or isinstance(left_padding, mx.array):
        return left_padding
    return mx.array(list(left_padding), dtype=mx.int32)


class KVCache:
    """Keys/values (b, kv_heads, capacity, head_dim) written in place up to `offset`.

    `left_padding` (b,) marks, per row of a batch, how many leading positions are
    padding that attention must never see.
    """

    def __init__(self, left_padding: list[int] | None = None):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.left_padding = _padding(left_padding)
        self.left_max = 0 if left_padding is None else int(max(left_padding))

    @property
    def positions(self) -> int | mx.array:
        """Where the next token sits in each row's own sequence: the shared write offset,
        less each row's left padding (RoPE rotates by this, so a row's keys are the same
        alone or in a batch)."""
        if self.left_padding is None:
            return self.offset
        return self.offset - self.left_padding

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (b, kv_heads, l, head_dim) keys/values; return everything so far."""
        end = self.offset + keys.shape[2]
        self.reserve(end, keys, values)
        self.keys[:, :, self.offset : end] = keys
        self.values[:, :, self.offset : end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def reserve(self, end: int, keys: mx.array | None = None, values: mx.array | None = None) -> None:
        """Make room for positions up to `end`, growing in steps of 256 (copying what
        is held) so that most tokens write in place."""
        if self.keys is not None and end <= self.keys.shape[2]:
            return
        keys = self.keys if keys is None else keys
        values = self.values if values is None else values
        capacity = ((end + _GROW - 1) // _GROW) * _GROW
        b, kvh, _, kd = keys.shape
        new_k = mx.zeros((b, kvh, capacity, kd), keys.dtype)
        new_v = mx.zeros((b, kvh, capacity, values.shape[3]), values.dtype)
        if self.keys is not None and self.offset:
            new_k[:, :, : self.offset] = self.keys[:, :, : self.offset]
            new_v[:, :, : self.offset] = self.values[:, :, : self.offset]
        self.keys, self.values = new_k, new_v

    def trim(self, n: int) -> int:
        """Forget the last n positions; returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def snapshot(self) -> int:
        return self.offset

    def restore(self, snap: int) -> None:
        if snap > self.offset:
            raise ValueError("cannot restore a KV snapshot newer than the cache")
        self.offset = snap

    @property
    def arrays(self) -> dict[str, mx.array]:
        if self.keys is None:
            return {}
        out = {"keys": self.keys[:, :, : self.offset], "values": self.values[:, :, : self.offset]}
        if self.left_padding is not None:
            out["left_padding"] = self.left_padding
        return out

    def set_arrays(self, arrays: dict[str, mx.array]) -> None:
        self.keys, self.values = arrays.get("keys"), arrays.get("values")
        self.offset = 0 if self.keys is None else self.keys.shape[2]
        self.left_padding = arrays.get("left_padding")
        self.left_max = 0 if self.left_padding is None else int(self.left_padding.max())


class MambaCache:
    """conv_state (b, k-1, conv_dim): the last k-1 pre-conv inputs, oldest first;
    ssm_state (b, h, p, n) float32. Both None until the first token."""

    def __init__(self, left_padding: list[int] | None = None):
        self.conv_state: mx.array | None = None
        self.ssm_state: mx.array | None = None
        self.offset = 0  # tokens seen, for bookkeeping only
        self.left_padding = _padding(left_padding)
        self.left_max = 0 if left_padding is None else int(max(left_padding))

        # Speculative verification: when `record` is set, the mixer keeps its next
        # multi-token call's inputs here (a `StepRecord`), so `rewind` can undo part of it.
        self.record = False
        self.recorded: StepRecord | None = None

    def snapshot(self) -> tuple:
        return (self.conv_state, self.ssm_state, self.offset)

    def restore(self, snap: tuple) -> None:
        self.conv_state, self.ssm_state, self.offset = snap

    def check_rewind(self, n: int) -> StepRecord:
        """The record that lets this layer forget its last n tokens; raises if none does."""
        rec = self.recorded
        if rec is None or rec.current is not self.ssm_state:
            raise ValueError("this Mamba2 layer has no record of its last call to rewind")
        if not 0 <= self.offset - rec.start - n <= rec.length:
            raise ValueError(f"cannot rewind {n} tokens: the last recorded call holds {rec.length}")
        return rec

    def rewind(self, n: int) -> None:
        """Forget the last n tokens. They must lie within the last recorded call,
        made right before (or rewound since): any other update voids the record."""
        rec = self.check_rewind(n)
        keep = self.offset - rec.start - n
        self.conv_state, self.ssm_state = rec.states_after(keep)
        self.offset = rec.start + keep
        rec.current = self.ssm_state

    @property
    def arrays(self) -> dict[str, mx.array]:
        out = {}
        if self.conv_state is not None:
            out = {"conv_state": self.conv_state, "ssm_state": self.ssm_state}
        return out

    def set_arrays(self, arrays: dict[str, mx.array]) -> None:
        self.conv_state, self.ssm_state = arrays.get("conv_state"), arrays.get("ssm_state")


class StepRecord:
    """One multi-token call of a Mamba2 layer, enough to rebuild its state after
    any of its positions.

    window: (b, k-1+l, ch) the conv inputs, previous k-1 first; x: (b, l, h, p)
    and B: (b, l, g, n) after the conv; dt: (b, l, h) discretized; A: (h,);
    initial_state: (b, h, p, n) or None (zeros); final: the call's own
    (conv_state, ssm_state), returned as is when nothing is dropped.
    """

    def __init__(self, start: int, window, x, dt, A, B, initial_state, final):
        self.start, self.length = start, x.shape[1]
        self.window, self.x, self.dt, self.A, self.B = window, x, dt, A, B
        self.initial_state, self.final = initial_state, final
        self.current = final[1]  # the state this record still describes

    def states_after(self, keep: int) -> tuple[mx.array | None, mx.array | None]:
        """(conv_state, ssm_state) after the first `keep` positions of the call."""
        if keep == self.length:
            return self.final
        k1 = self.window.shape[1] - self.length  # k - 1
        conv = self.window[:, keep : keep + k1]
        if keep == 0:
            return conv, self.initial_state
        part = slice(0, keep)
        state = ssm.state_after(
            self.x[:, part], self.dt[:, part], self.A, self.B[:, part], self.initial_state
        )
        return conv, state


Cache = list  # one KVCache or MambaCache per layer, as model.make_cache() builds it


@dataclass(frozen=True)
class CacheSnapshot:
    """A whole cache at one moment: restoring it costs nothing."""

    layers: tuple
    offset: int


def snapshot(cache: Cache) -> CacheSnapshot:
    return CacheSnapshot(tuple(c.snapshot() for c in cache), cache_length(cache))


def restore(cache: Cache, snap: CacheSnapshot) -> None:
    if len(snap.layers) != len(cache):
        raise ValueError("snapshot is from a cache with a different number of layers")
    for c, s in zip(cache, snap.layers):
        c.restore(s)
    for c in cache:
        if isinstance(c, MambaCache):
            c.offset = snap.offset


def cache_length(cache: Cache) -> int:
    """Tokens the cache has seen."""
    return cache[0].offset if cache else 0


def can_trim(cache: Cache) -> bool:
    """Trimming is exact only when no layer carries a recurrent state."""
    return all(isinstance(c, KVCache) for c in cache)


def trim(cache: Cache, n: int) -> int:
    """Drop the last n tokens from every attention layer. Returns tokens dropped.

    Raises for caches with Mamba2 layers, whose state cannot be rewound: restore
    a snapshot instead.
    """
    if not can_trim(cache):
        raise ValueError("a cache with Mamba2 layers cannot be trimmed; restore a snapshot")
    dropped = 0
    for c in cache:
        dropped = c.trim(n)
    return dropped


def record(cache: Cache, on: bool = True) -> None:
    """Have every Mamba2 layer keep the inputs of its next multi-token call (see `rewind`)."""
    for c in cache:
        if isinstance(c, MambaCache):
            c.record = on


def rewind(cache: Cache, n: int) -> None:
    """Forget the last n tokens of every layer: attention trimmed, Mamba2 states
    rebuilt from the record of the last call (made with `record` on). n may not
    reach back past the start of that call."""
    for c in cache:  # check every layer before changing any
        if isinstance(c, MambaCache):
            c.check_rewind(n)
    for c in cache:
        if isinstance(c, KVCache):
            c.trim(n)
        else:
            c.rewind(n)


def eval_cache(cache: Cache) -> None:
    """Materialise every array the cache holds (keeps prefill memory bounded)."""
    arrays = [a for c in cache for a in c.arrays.values()]
    if arrays:
        mx.eval(arrays)


def save_cache(path: str | Path, cache: Cache, metadata: dict[str, Any] | None = None) -> None:
    """Write the cache (and optional JSON-able metadata) to one safetensors file."""
    arrays: dict[str, mx.array] = {}
    kinds = []
    for i, c in enumerate(cache):
        kinds.append("attention" if isinstance(c, KVCache) else "mamba")
        for name, value in c.arrays.items():
            arrays[f"layers.{i}.{name}"] = value
    meta = {
        "format": "granite-mlx-cache/1",
        "kinds": json.dumps(kinds),
        "offset": str(cache_length(cache)),
        "metadata": json.dumps(metadata or {}),
    }
    path = Path(path)
    # MLX adds ".safetensors" to a name without it: write a temporary name that has
    # it, then rename to the caller's name (any name); never leave a half-written
    # file under the real name, nor a partial file after a failure.
    tmp = path.with_name(f".{path.name}.partial.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _private(path)


def _private(path: Path) -> None:
    """Conversations are the user's: files that hold them are readable by the user only."""
    try:
        path.chmod(0o600)
    except OSError:
        pass


def load_cache(path: str | Path) -> tuple[Cache, dict[str, Any]]:
    """Read a cache written by `save_cache`; returns (cache, metadata)."""
    from .safetensors_check import check_safetensors

    path = Path(path)
    check_safetensors(path)
    arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    if meta.get("format") != "granite-mlx-cache/1":
        raise CheckpointError(f"{path} is not a granite-mlx cache file.")
    try:
        kinds = json.loads(meta["kinds"])
        offset = int(meta["offset"])
        metadata = json.loads(meta.get("metadata", "{}"))
        if not isinstance(kinds, list) or not isinstance(metadata, dict):
            raise ValueError("kinds must be a list and metadata an object")
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is a damaged granite-mlx cache file ({exc}).") from exc
    cache: Cache = []
    for i, kind in enumerate(kinds):
        if kind not in ("attention", "mamba"):
            raise CheckpointError(f"{path} is a damaged granite-mlx cache file (layer {i}: {kind!r}).")
        c = KVCache() if kind == "attention" else MambaCache()
        prefix = f"layers.{i}."
        c.set_arrays({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
        c.offset = offset
        cache.append(c)
    return cache, metadata


# --------------------------------------------------------------------------
# Rows: the engine's batch is one cache whose rows come and go
# --------------------------------------------------------------------------
#
# Rows of different lengths share one write offset: each row's tokens end at the
# offset and start after its left padding (KV positions [left, offset)). A Mamba2
# row needs no alignment: its state is the same size whatever the length.


def allocate(cache: Cache, model) -> Cache:
    """Give a cache that has seen no token its buffers (zero states, empty K/V of one
    256-position block), so that it can join a batch and run the compiled step."""
    dtype = model.model.norm.weight.dtype  # the activations' dtype: norms are never quantized
    for c, layer in zip(cache, model.layers):
        if isinstance(c, KVCache) and c.keys is None:
            attn = layer.self_attn
            shape = (1, attn.n_kv_heads, _GROW, attn.head_dim)
            c.keys, c.values = mx.zeros(shape, dtype), mx.zeros(shape, dtype)
        elif isinstance(c, MambaCache) and c.ssm_state is None:
            m = layer.mamba
            c.conv_state = mx.zeros((1, m.d_conv - 1, m.conv_dim), dtype)
            c.ssm_state = mx.zeros((1, m.n_heads, m.head_dim, m.d_state), mx.float32)
    return cache


def batch_size(cache: Cache) -> int:
    for c in cache:
        arr = c.keys if isinstance(c, KVCache) else c.ssm_state
        if arr is not None:
            return arr.shape[0]
    return 1


def _left(cache: Cache) -> mx.array:
    left = cache[0].left_padding
    return mx.zeros((batch_size(cache),), mx.int32) if left is None else left


def _set_rows(layers: list, offset: int, left: mx.array | None) -> None:
    left_max = 0 if left is None else int(left.max().item())
    for c in layers:
        c.offset, c.left_padding, c.left_max = offset, left, left_max
        if left_max == 0:
            c.left_padding = None


def _shift_kv(arr: mx.array, length: int, shift: int, capacity: int) -> mx.array:
    """The first `length` positions of arr, moved right by `shift`, in `capacity` positions."""
    b, h, _, d = arr.shape
    out = mx.zeros((b, h, capacity, d), arr.dtype)
    if length:
        out[:, :, shift : shift + length] = arr[:, :, :length]
    return out


def merge(a: Cache, b: Cache) -> Cache:
    """One cache holding the rows of `a`, then those of `b` (both allocated).

    The shorter side is padded on the left so that every row ends at the common
    offset: a copy of the attention K/V (at join time only, never per token).
    """
    offset = max(cache_length(a), cache_length(b))
    capacity = ((offset + 1 + _GROW - 1) // _GROW) * _GROW
    shift_a, shift_b = offset - cache_length(a), offset - cache_length(b)
    left = mx.concatenate([_left(a) + shift_a, _left(b) + shift_b])
    out: Cache = []
    for ca, cb in zip(a, b):
        if isinstance(ca, KVCache):
            c = KVCache()
            c.keys = mx.concatenate([
                _shift_kv(ca.keys, ca.offset, shift_a, capacity),
                _shift_kv(cb.keys, cb.offset, shift_b, capacity),
            ])  # fmt: skip
            c.values = mx.concatenate([
                _shift_kv(ca.values, ca.offset, shift_a, capacity),
                _shift_kv(cb.values, cb.offset, shift_b, capacity),
            ])  # fmt: skip
        else:
            c = MambaCache()
            c.conv_state = mx.concatenate([ca.conv_state, cb.conv_state])
            c.ssm_state = mx.concatenate([ca.ssm_state, cb.ssm_state])
        out.append(c)
    _set_rows(out, offset, left)
    return out


def take(cache: Cache, rows: list[int]) -> Cache:
    """A cache of only these rows (in this order). Padding every remaining row shares
    is dropped once it reaches a whole block, so a long-gone long row stops costing."""
    idx = mx.array(rows, dtype=mx.int32)
    left = _left(cache)[idx]
    drop = int(left.min().item()) // _GROW * _GROW
    offset = cache_length(cache) - drop
    out: Cache = []
    for c in cache:
        if isinstance(c, KVCache):
            n = KVCache()
            n.keys, n.values = c.keys[idx, :, drop:], c.values[idx, :, drop:]
        else:
            n = MambaCache()
            n.conv_state, n.ssm_state = c.conv_state[idx], c.ssm_state[idx]
        out.append(n)
    _set_rows(out, offset, left - drop)
    return out


def layers(cache: Cache) -> Cache:
    """New layer objects holding the same arrays: the cache as it is now, while the
    original's layers go on to hold later tokens."""
    return [copy.copy(c) for c in cache]


def row(cache: Cache, i: int) -> Cache:
    """Row i as a cache of its own, without padding: contiguous copies (a view would
    keep the whole batch's buffers alive)."""
    padding = cache[0].left_padding  # (read whole: slicing first would queue an op)
    left = 0 if padding is None else int(padding.tolist()[i])
    offset = cache_length(cache)
    out: Cache = []
    for c in cache:
        if isinstance(c, KVCache):
            n = KVCache()
            n.keys = mx.contiguous(c.keys[i : i + 1, :, left:offset])
            n.values = mx.contiguous(c.values[i : i + 1, :, left:offset])
        else:
            n = MambaCache()
            n.conv_state = mx.contiguous(c.conv_state[i : i + 1])
            n.ssm_state = mx.contiguous(c.ssm_state[i : i + 1])
        out.append(n)
    _set_rows(out, offset - left, None)
    return out


def assign(dst: Cache, src: Cache) -> None:
    """Make the layers of `dst` hold what `src` holds (a caller's cache object, updated
    in place)."""
    for d, s in zip(dst, src):
        if isinstance(d, KVCache):
            d.keys, d.values = s.keys, s.values
        else:
            d.conv_state, d.ssm_state = s.conv_state, s.ssm_state
        d.offset, d.left_padding, d.left_max = s.offset, s.left_padding, s.left_max


def nbytes(cache: Cache) -> int:
    """Bytes held by the cache's arrays (attention K/V counted up to the offset)."""
    return sum(a.nbytes for c in cache for a in c.arrays.values())
