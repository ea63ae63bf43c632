"""Per-layer caches for the hybrid decoder.

`KVCache` holds an attention layer's keys and values; `MambaCache` a Mamba2
layer's conv window and SSM state. Both take any number of tokens per call.

Snapshots are cheap: a Mamba2 state has a fixed size and every update makes new
arrays (the old ones are never written), so a snapshot keeps references; a
KV snapshot is just the length, since positions before it are never rewritten.
Only the attention part can be trimmed: a recurrent state cannot be rewound,
which is what snapshots are for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

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

    def snapshot(self) -> tuple:
        return (self.conv_state, self.ssm_state, self.offset)

    def restore(self, snap: tuple) -> None:
        self.conv_state, self.ssm_state, self.offset = snap

    @property
    def arrays(self) -> dict[str, mx.array]:
        out = {}
        if self.conv_state is not None:
            out = {"conv_state": self.conv_state, "ssm_state": self.ssm_state}
        return out

    def set_arrays(self, arrays: dict[str, mx.array]) -> None:
        self.conv_state, self.ssm_state = arrays.get("conv_state"), arrays.get("ssm_state")


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
    tmp = path.with_name(path.name + ".partial.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=meta)
    tmp.replace(path)  # never leave a half-written file under the real name


def load_cache(path: str | Path) -> tuple[Cache, dict[str, Any]]:
    """Read a cache written by `save_cache`; returns (cache, metadata)."""
    from .safetensors_check import check_safetensors

    path = Path(path)
    check_safetensors(path)
    arrays, meta = mx.load(str(path), return_metadata=True)
    if meta.get("format") != "granite-mlx-cache/1":
        raise CheckpointError(f"{path} is not a granite-mlx cache file.")
    cache: Cache = []
    for i, kind in enumerate(json.loads(meta["kinds"])):
        c = KVCache() if kind == "attention" else MambaCache()
        prefix = f"layers.{i}."
        c.set_arrays({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
        c.offset = int(meta["offset"])
        cache.append(c)
    return cache, json.loads(meta.get("metadata", "{}"))
