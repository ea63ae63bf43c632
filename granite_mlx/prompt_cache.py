"""Prompt reuse across requests: exact cache snapshots indexed by their token ids.

A request whose prompt starts with tokens seen before (the same system prompt,
the conversation so far, the question being regenerated) resumes from the
longest such prefix and prefills only the rest. For a hybrid model that needs
the Mamba2 state *at* the end of the prefix: a recurrent state cannot be
rewound, so only positions where a snapshot was taken can be resumed from (the
engine takes them at message boundaries, at the end of every prompt and of
every answer). Attention K/V can be cut anywhere, so an attention-only model
resumes from any shared prefix.

The index is a radix tree over token ids (as SGLang's radix cache):

    root ── [system prompt]─┬─ [question 1][answer 1] ── [question 2] ...
                            └─ [question 1'] ...

Each edge holds the attention K/V of its own positions only (so a shared prefix
is stored once) and, where a snapshot was taken at its end, the Mamba2 conv
window and SSM state there (float32, fixed size: ~22 MB for H-350M). Restoring
concatenates the K/V along the path; the states are immutable arrays and are
shared, not copied. At the end of a whole prompt the engine also records the
logits of its last position, so that the same prompt again (a regenerated
answer, another sample) needs no model pass before its first token.

Memory is bounded by `max_bytes`: past it, the least recently used leaves go
first, and the least recently used states of inner nodes (whose K/V the
branches below still need).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from .cache import Cache, KVCache, MambaCache, cache_length

__all__ = ["PromptCache"]


class _Node:
    __slots__ = ("children", "depth", "kv", "logits", "parent", "state", "tokens", "used")

    def __init__(self, tokens: list[int], parent: _Node | None, depth: int):
        self.tokens = tokens  # the edge from the parent
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.depth = depth  # tokens from the root to the end of the edge
        self.kv: list[tuple[mx.array, mx.array]] = []  # per attention layer: the edge's K, V
        self.state: list[tuple[mx.array, mx.array]] | None = None  # per Mamba2 layer, at depth
        self.logits: mx.array | None = None  # (1, vocab) float32: the next token's, at depth
        self.used = 0

    def kv_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)

    def state_bytes(self) -> int:
        """The snapshot at its end: Mamba2 states and logits (evicted together)."""
        held = sum(c.nbytes + s.nbytes for c, s in self.state or ())
        return held + (self.logits.nbytes if self.logits is not None else 0)

    def drop_snapshot(self) -> int:
        freed = self.state_bytes()
        self.state = self.logits = None
        return freed


def _common(edge: list[int], ids: Sequence[int], start: int) -> int:
    n = min(len(edge), len(ids) - start)
    for i in range(n):
        if edge[i] != ids[start + i]:
            return i
    return n


def _copy(a: mx.array) -> mx.array:
    # A copy with a buffer of its own: a view would keep its whole source buffer alive
    # (a prefill chunk's conv input, a split edge) while the budget counts only the view.
    # Not mx.contiguous: it hands back a view that is already contiguous (the last
    # columns of a conv window) as is. Multiplying by one keeps every bit, -0.0 too.
    return a * 1


class PromptCache:
    """Exact snapshots of a model's cache, found by the longest shared token prefix.

    `insert(ids, cache)` records a cache that holds exactly `ids`; `lookup(ids)`
    returns `(length, cache)` for the longest recorded prefix of `ids` (a new
    cache object the caller may extend), or None. `insert(ids, cache, logits)` also
    records the logits after `ids`, which `lookup_whole(ids)` gives back with the cache.
    """

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int | float) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a number of bytes >= 0, got {max_bytes!r}")
        self.max_bytes = int(max_bytes)
        self._root = _Node([], None, 0)
        self._kinds: list[str] | None = None  # "attention" / "mamba" per layer
        self._tick = 0
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_reused = 0
        self.evictions = 0

    # --- queries -------------------------------------------------------------------------

    @property
    def attention_only(self) -> bool:
        return self._kinds is not None and "mamba" not in self._kinds

    def lookup(self, ids: Sequence[int], limit: int | None = None) -> tuple[int, Cache] | None:
        """The longest usable prefix of `ids` (at most `limit` tokens) and its cache."""
        limit = len(ids) if limit is None else min(limit, len(ids))
        if self._kinds is None or limit <= 0:
            self.misses += 1
            return None
        node, pos, best = self._root, 0, None  # best: (length, node, tokens used of its edge)
        while pos < limit:
            child = node.children.get(ids[pos])
            if child is None:
                break
            m = _common(child.tokens, ids, pos)
            if self.attention_only:
                # K/V can be cut anywhere: any matched position will do.
                used = min(m, limit - pos)
                best = (pos + used, child, used)
            elif m == len(child.tokens) and child.state is not None and pos + m <= limit:
                best = (pos + m, child, m)
            if m < len(child.tokens):
                break
            node, pos = child, pos + m
        if best is None:
            self.misses += 1
            return None
        length, node, used = best
        self._touch(node)
        self.hits += 1
        self.tokens_reused += length
        return length, self._restore(node, used)

    def lookup_whole(self, ids: Sequence[int]) -> tuple[Cache, mx.array] | None:
        """The cache holding all of `ids` and the logits after them, if recorded."""
        path = self._path(ids)
        if not path or path[-1].depth != len(ids) or path[-1].logits is None:
            return None
        node = path[-1]
        if node.state is None and not self.attention_only:
            return None
        self._touch(node)
        self.hits += 1
        self.tokens_reused += len(ids)
        return self._restore(node, len(node.tokens)), node.logits

    def _restore(self, node: _Node, used: int) -> Cache:
        path = []
        n = node
        while n is not self._root:
            path.append(n)
            n = n.parent
        path.reverse()
        cut = {id(node): used}
        cache: Cache = []
        a = m = 0
        for kind in self._kinds:
            if kind == "attention":
                ks = [n.kv[a][0][:, :, : cut.get(id(n), len(n.tokens))] for n in path]
                vs = [n.kv[a][1][:, :, : cut.get(id(n), len(n.tokens))] for n in path]
                c = KVCache()
                c.keys, c.values = mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)
                c.offset = c.keys.shape[2]
                a += 1
            else:
                c = MambaCache()
                c.conv_state, c.ssm_state = node.state[m]
                c.offset = node.depth
                m += 1
            cache.append(c)
        return cache

    def _touch(self, node: _Node) -> None:
        self._tick += 1
        while node is not None:
            node.used = self._tick
            node = node.parent

    # --- recording -----------------------------------------------------------------------

    def insert(
        self, ids: Sequence[int], cache: Cache, logits: mx.array | None = None, wait: bool = True
    ) -> None:
        """Record `cache`, which holds exactly `ids` (one row, no padding), and the
        logits after `ids` when given. With ``wait=False`` the copies are queued and not
        waited for (the source arrays stay alive until they are made)."""
        done = mx.eval if wait else mx.async_eval
        n = len(ids)
        if n == 0 or self.max_bytes == 0:
            return
        if cache_length(cache) != n:
            raise ValueError(f"the cache holds {cache_length(cache)} tokens, not {n}")
        kinds = ["attention" if isinstance(c, KVCache) else "mamba" for c in cache]
        if self._kinds is None:
            self._kinds = kinds
        elif kinds != self._kinds:
            raise ValueError("this prompt cache holds another model's caches")
        node, pos = self._root, 0
        while pos < n:
            child = node.children.get(ids[pos])
            if child is None:
                break
            m = _common(child.tokens, ids, pos)
            if m < len(child.tokens):
                child = self._split(child, m, done)
            node, pos = child, pos + m
        if pos < n:
            leaf = _Node([int(t) for t in ids[pos:n]], node, n)
            leaf.kv = [
                (_copy(c.keys[:, :, pos:n]), _copy(c.values[:, :, pos:n]))
                for c in cache
                if isinstance(c, KVCache)
            ]
            done(leaf.kv)
            node.children[leaf.tokens[0]] = leaf
            self.nbytes += leaf.kv_bytes()
            node = leaf
        if node.state is None and not self.attention_only:
            node.state = [
                (_copy(c.conv_state), _copy(c.ssm_state)) for c in cache if isinstance(c, MambaCache)
            ]
            done(node.state)
            self.nbytes += node.state_bytes()
        if logits is not None and node.logits is None:
            node.logits = _copy(logits.astype(mx.float32).reshape(1, -1))
            done(node.logits)
            self.nbytes += node.logits.nbytes
        self._touch(node)
        self._evict()

    def _split(self, child: _Node, m: int, done=mx.eval) -> _Node:
        """Cut `child`'s edge after m tokens; returns the new node ending there (no state)."""
        parent = child.parent
        mid = _Node(child.tokens[:m], parent, child.depth - len(child.tokens) + m)
        mid.kv = [(_copy(k[:, :, :m]), _copy(v[:, :, :m])) for k, v in child.kv]
        child.kv = [(_copy(k[:, :, m:]), _copy(v[:, :, m:])) for k, v in child.kv]
        done(mid.kv, child.kv)
        child.tokens = child.tokens[m:]
        child.parent = mid
        mid.children[child.tokens[0]] = child
        parent.children[mid.tokens[0]] = mid
        mid.used = child.used
        return mid

    # --- memory --------------------------------------------------------------------------

    def _nodes(self) -> list[_Node]:
        out, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes:
            candidates = [
                n for n in self._nodes()
                if not n.children or n.state is not None or n.logits is not None
            ]  # fmt: skip
            if not candidates:
                return
            victim = min(candidates, key=lambda n: n.used)
            self.evictions += 1
            if victim.children:
                # Branches below still need its K/V: drop only its snapshot.
                self.nbytes -= victim.drop_snapshot()
                continue
            self.nbytes -= victim.kv_bytes() + victim.state_bytes()
            del victim.parent.children[victim.tokens[0]]

    def clear(self) -> None:
        self._root = _Node([], None, 0)
        self.nbytes = 0

    def __len__(self) -> int:
        """Snapshots held (positions a request can resume from, for a hybrid model)."""
        return sum(1 for n in self._nodes() if n.state is not None)

    def states(self, ids: Sequence[int]) -> list[int]:
        """Lengths along `ids` where a hybrid snapshot is held (ascending)."""
        return [n.depth for n in self._path(ids) if n.state is not None]

    def _path(self, ids: Sequence[int]) -> list[_Node]:
        """The nodes from the root whose whole edges are a prefix of `ids`."""
        out, node, pos = [], self._root, 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None or _common(child.tokens, ids, pos) < len(child.tokens):
                break
            node, pos = child, pos + len(child.tokens)
            out.append(node)
        return out
