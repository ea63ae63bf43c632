"""Granite across several machines on MLX's own `mx.distributed`: pipeline and tensor parallel.

Every rank runs the same program (started by `mlx.launch`, see the README's "Several
Macs"). `load_model(path, parallel="pipeline" | "tensor")` gives each rank a
`ShardedModel` that keeps the `Model` contract: `model(tokens (b, l), cache) -> logits
(b, l, vocab)` on every rank, the same logits bit for bit, and `make_cache()` with this
rank's part of the cache. Generation, sessions, batches and the engine therefore run
unchanged on every rank, in lockstep, as long as every rank is given the same inputs
and samples with the same random state (the seed of rank 0 is shared when the model
loads; an explicit seed is the same everywhere anyway).

Pipeline: rank r runs a contiguous stage of layers, the stages balanced by weight bytes
plus state/KV memory (`plan_stages`). Rank r receives the hidden states from rank r-1
(`recv`), runs its layers and sends them on to rank r+1 (`send`: ring neighbours); the
last stage's output is then all-gathered, so every rank has the final hidden states.
Only rank 0 looks tokens up, so only it holds the whole embedding. A stage's caches are
made to depend on its send, so that evaluating the cache alone (a prefill chunk) also
performs the send the next stage waits for (mlx-lm's pipelines do the same).

Tensor: every layer is split by heads. Attention: q/k/v by heads (key/value heads
repeated when there are fewer than ranks), o_proj by its input columns. Mamba2:
in_proj by its sections z | x | B | C | dt, each cut to this rank's heads (B and C to
this rank's groups: with one group, as in every released checkpoint, they are
replicated), conv1d to match, dt_bias/A_log/D/norm by heads, out_proj by columns. The
gated RMSNorm takes the RMS over a whole group of d_inner, which a rank may hold only
part of: the ranks' sums of squares are added up first (`RMSNormGated.sum_over_ranks`).
MLP and experts: the intermediate dimension (each expert's too), input_linear's two
halves cut alike, output_linear by columns. After the mixer and after the MLP block each
rank holds a partial sum of the block's output: `all_sum` (`DecoderLayer.reduce`).

Both: the embedding and the output head are split by vocabulary rows (tensor: the
lookup picks this rank's rows and an `all_sum` fills in the others). Each rank computes
its vocab/N logits and an `all_gather` assembles them, so every rank samples from the
same logits bit for bit -- even Macs whose kernels round differently -- and holds 1/N
of the head. (A vocabulary that does not divide evenly gives the last rank fewer rows;
its logits are padded for the gather and the padding dropped.)

Loading: `mx.load` maps safetensors lazily; every tensor is cut to this rank's part
before anything is read, and evaluated one at a time, so a rank reads only its layers
(pipeline) or holds only its slices (tensor): weight memory about 1/N. Quantized
checkpoints (mlx-community's layout and our converter's) split the same way: rows are
whole, and a cut across the packed input axis must fall on a quantization group.

The engine: a server's `Engine` decides each step from requests arriving on rank 0.
`LockstepEngine` (rank 0) sends each step's new requests and aborts to the other
ranks, which replay them on their own engine (`follow`), so every rank makes the same
model calls; the traffic is one small all_sum per step when nothing is new.

Failures: ranks compare a fingerprint of config + weights before loading (a rank with
another checkpoint stops everyone with a message); a model that cannot be split N ways
says why; a rank that dies breaks the ring's sockets, which MLX reports as an error on
the others (`is_peer_error`); a rank that hangs (a frozen machine keeps its sockets
open) is caught by a `Watchdog` that ends the process when no model call happens for
too long.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelArgs
from .engine import Engine, GenerationResponse, Request
from .errors import GraniteError
from .model import Model
from .sampling import SamplingParams, _draw_seed

__all__ = [
    "MODES",
    "Comm",
    "LaunchError",
    "LockstepEngine",
    "ParallelError",
    "Shard",
    "ShardedModel",
    "SplitError",
    "Watchdog",
    "broadcast_object",
    "follow",
    "is_peer_error",
    "load_sharded",
    "plan_stages",
    "rank_weight_bytes",
]

MODES = ("pipeline", "tensor")
# Context assumed when stages are balanced by memory: attention K/V grows with it.
BALANCE_CONTEXT = 32768
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class ParallelError(GraniteError):
    """A distributed run cannot go on: a rank was lost, or could not join."""


class LaunchError(ParallelError):
    """The program was started in a way a distributed run cannot use (every rank alike)."""


class SplitError(ParallelError):
    """A model that cannot be split that many ways, or ranks that disagree on the model:
    every rank meets it alike."""


def is_peer_error(exc: BaseException) -> bool:
    """An MLX communication error: another rank died or the link failed."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and text.startswith(
        ("[ring]", "[jaccl]", "[mpi]", "[nccl]")
    )


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise SplitError(f"parallel must be one of {', '.join(map(repr, MODES))}, got {mode!r}.")


# --------------------------------------------------------------------------
# Communication
# --------------------------------------------------------------------------


class Comm:
    """The group's collectives as the sharded model uses them.

    While `traffic` is a list, each call appends (op, shape, dtype, bytes this rank
    sends), with the ring backend's algorithms: all_sum is a reduce-scatter then an
    all-gather, 2(N-1)/N of the array; all_gather sends N-1 times its input.
    """

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.traffic: list[tuple[str, tuple, str, int]] | None = None

    def _log(self, op: str, x: mx.array, sent: float) -> None:
        if self.traffic is not None:
            self.traffic.append((op, tuple(x.shape), str(x.dtype), int(sent)))

    def all_sum(self, x: mx.array) -> mx.array:
        n = self.size
        self._log("all_sum", x, 2 * (n - 1) * max(x.size, n) * x.itemsize / n)
        return mx.distributed.all_sum(x, group=self.group)

    def all_gather(self, x: mx.array) -> mx.array:
        """(d0, ...) on each rank -> (N * d0, ...), rank order."""
        self._log("all_gather", x, (self.size - 1) * x.nbytes)
        return mx.distributed.all_gather(x, group=self.group)

    def send(self, x: mx.array, dst: int) -> mx.array:
        self._log("send", x, x.nbytes)
        return mx.distributed.send(x, dst, group=self.group)

    def recv(self, shape: tuple, dtype: mx.Dtype, src: int) -> mx.array:
        return mx.distributed.recv(shape, dtype, src, group=self.group)


def _share(data: bytes | None, comm: Comm, length: int | None = None) -> tuple[int, bytes]:
    """Rank 0's bytes on every rank, after their length (rank 0 may send a negative
    `length` as a signal, with no bytes). One all_sum when there are none."""
    if comm.rank == 0:
        length = len(data or b"") if length is None else length
    n = int(comm.all_sum(mx.array([length if comm.rank == 0 else 0], mx.int32)).item())
    if n <= 0:
        return n, b""
    if comm.rank == 0:
        buf = mx.array(np.frombuffer(data, np.uint8))
    else:
        buf = mx.zeros((n,), mx.uint8)
    return n, bytes(np.array(comm.all_sum(buf)))  # the others add zeros


def broadcast_object(obj: Any, comm: Comm) -> Any:
    """Rank 0's JSON-able `obj` on every rank (the others pass anything, e.g. None)."""
    n, data = _share(json.dumps(obj).encode() if comm.rank == 0 else None, comm)
    return json.loads(data) if n > 0 else None


def barrier(comm: Comm) -> None:
    """Wait until every rank got here; returns at once if a rank is gone."""
    try:
        mx.eval(comm.all_sum(mx.array([1], mx.int32)))
    except RuntimeError as e:
        if not is_peer_error(e):
            raise


def share_seed(comm: Comm) -> int:
    """Seed MLX's generator with one seed drawn by rank 0, so sampling agrees everywhere."""
    mine = int.from_bytes(os.urandom(4), "little") >> 1 if comm.rank == 0 else 0
    seed = int(comm.all_sum(mx.array([mine], mx.int32)).item())
    mx.random.seed(seed)
    return seed


# --------------------------------------------------------------------------
# How a rank's part differs from the whole
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """This rank's part: `layers` [start, stop) of the model's layers (all of them in
    tensor mode, each cut to its heads) and `vocab` [start, stop) of the head's rows."""

    mode: str
    rank: int
    size: int
    layers: tuple[int, int]
    vocab: tuple[int, int]

    def describe(self) -> str:
        return (
            f"{self.mode} rank {self.rank} of {self.size}: layers {self.layers[0]}.."
            f"{self.layers[1] - 1}, vocab rows {self.vocab[0]}..{self.vocab[1] - 1}"
        )


class _Unaligned(Exception):
    pass


def _take(w: mx.array, ranges: list[tuple[int, int]], axis: int, total: int) -> mx.array:
    """The slices [a, b) of `w` along `axis`, concatenated; a, b count `total` features
    spread over w.shape[axis] entries (fewer when quantized: packed words, groups)."""
    axis = axis % w.ndim
    size = w.shape[axis]
    parts = []
    for a, b in ranges:
        if (a * size) % total or (b * size) % total:
            raise _Unaligned
        index = [slice(None)] * w.ndim
        index[axis] = slice(a * size // total, b * size // total)
        parts.append(w[tuple(index)])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)


def _split_error(size: int, why: str, fix: str = "") -> SplitError:
    fix = fix or "Use parallel='pipeline', or a number of ranks that divides it."
    return SplitError(f"Cannot split this model {size} ways: {why}. {fix}")


def _even(count: int, size: int, rank: int, what: str) -> tuple[int, int]:
    if count % size:
        raise _split_error(size, f"{what} is {count}, not a multiple of {size}")
    per = count // size
    return rank * per, (rank + 1) * per


def vocab_rows(vocab: int, size: int, rank: int) -> tuple[int, int]:
    """A rank's rows of the output head: ceil(vocab / size) each, the last rank fewer."""
    per = -(-vocab // size)
    return min(rank * per, vocab), min((rank + 1) * per, vocab)


class _Plan:
    """Which tensors a rank keeps, under which name, cut how; and what the rank's model
    modules must know about it. Subclasses: the two modes."""

    def __init__(self, args: ModelArgs, rank: int, size: int):
        self.args, self.rank, self.size = args, rank, size
        self.vocab = vocab_rows(args.vocab_size, size, rank)

    def shard(self) -> Shard:
        raise NotImplementedError

    def local_name(self, name: str) -> str | None:
        """This rank's name for the checkpoint tensor `name`, None if it is not needed."""
        raise NotImplementedError

    def cut(self, name: str, w: mx.array) -> mx.array:
        """This rank's part of tensor `name` (a lazy slice)."""
        raise NotImplementedError

    def restructure(self, model: ShardedModel) -> None:
        """Turn the (lazy, never evaluated) whole model into this rank's part."""
        raise NotImplementedError

    def local_quantization(self, quant: dict[str, Any]) -> dict[str, Any]:
        return quant

    def _head_rows(self, w: mx.array) -> mx.array:
        return _take(w, [self.vocab], max(w.ndim - 2, 0), self.args.vocab_size)


class _PipelinePlan(_Plan):
    def __init__(self, args: ModelArgs, rank: int, size: int, stages: list[tuple[int, int]]):
        super().__init__(args, rank, size)
        self.stages = stages
        self.start, self.stop = stages[rank]

    def shard(self) -> Shard:
        return Shard("pipeline", self.rank, self.size, (self.start, self.stop), self.vocab)

    def local_name(self, name: str) -> str | None:
        m = _LAYER.match(name)
        if m is not None:
            i = int(m.group(1))
            if not self.start <= i < self.stop:
                return None
            return f"model.layers.{i - self.start}.{name[m.end() :]}"
        if name.startswith("model.embed_tokens."):
            # Rank 0 looks tokens up; with tied embeddings the others need head rows.
            return name if self.rank == 0 or self.args.tie_word_embeddings else None
        return name

    def cut(self, name: str, w: mx.array) -> mx.array:
        # Rank 0 keeps the whole (tied) embedding to look tokens up; the head is split.
        if name.startswith("lm_head.") or (name.startswith("model.embed_tokens.") and self.rank):
            return self._head_rows(w)
        return w

    def restructure(self, model: ShardedModel) -> None:
        inner = model.model
        inner.layers = inner.layers[self.start : self.stop]
        if self.rank > 0 and not self.args.tie_word_embeddings:
            del inner["embed_tokens"]
        _cut_placeholders(model, self)

    def local_quantization(self, quant: dict[str, Any]) -> dict[str, Any]:
        """Per-module settings keyed by layer: renumbered, other stages' dropped."""
        out = {}
        for key, value in quant.items():
            m = _LAYER.match(key)
            if m is None:
                out[key] = value
            elif self.start <= int(m.group(1)) < self.stop:
                out[f"model.layers.{int(m.group(1)) - self.start}.{key[m.end() :]}"] = value
        return out


class _TensorPlan(_Plan):
    def __init__(self, args: ModelArgs, rank: int, size: int):
        super().__init__(args, rank, size)
        n, r = size, rank
        self.rules: list[tuple[re.Pattern, str, list[tuple[int, int]], int]] = []
        if "attention" in args.layer_types:
            self._attention(n, r)
        if args.has_mamba:
            self._mamba(n, r)
        inter = args.shared_intermediate_size
        a, b = _even(inter, n, r, "shared_intermediate_size")
        self._rule(
            r"\.shared_mlp\.input_linear", "rows", [(a, b), (inter + a, inter + b)], 2 * inter
        )
        self._rule(r"\.shared_mlp\.output_linear", "cols", [(a, b)], inter)
        if args.use_moe:
            inter = args.intermediate_size
            a, b = _even(inter, n, r, "the experts' intermediate_size")
            moe = r"\.block_sparse_moe\."
            self._rule(moe + "input_linear", "rows", [(a, b), (inter + a, inter + b)], 2 * inter)
            self._rule(moe + "output_linear", "cols", [(a, b)], inter)

    def _rule(self, module: str, how: str, ranges: list[tuple[int, int]], total: int) -> None:
        self.rules.append(
            (re.compile(module + r"\.(weight|scales|biases|bias)$"), how, ranges, total)
        )

    def _attention(self, n: int, r: int) -> None:
        args = self.args
        hd, nh, nkv = args.head_dim, args.num_attention_heads, args.num_key_value_heads
        self.q = _even(nh, n, r, "num_attention_heads")
        if nkv % n == 0:
            self.kv = _even(nkv, n, r, "num_key_value_heads")
        elif n % nkv == 0:  # fewer K/V heads than ranks: each rank keeps the one its queries read
            group = self.q[0] // (nh // nkv)
            self.kv = (group, group + 1)
        else:
            raise _split_error(
                n, f"num_key_value_heads is {nkv}: neither a multiple nor a divisor of {n}"
            )
        q = [(self.q[0] * hd, self.q[1] * hd)]
        kv = [(self.kv[0] * hd, self.kv[1] * hd)]
        self._rule(r"\.self_attn\.q_proj", "rows", q, nh * hd)
        self._rule(r"\.self_attn\.[kv]_proj", "rows", kv, nkv * hd)
        self._rule(r"\.self_attn\.o_proj", "cols", q, nh * hd)

    def _mamba(self, n: int, r: int) -> None:
        args = self.args
        heads, p, g, s = (
            args.mamba_n_heads,
            args.mamba_d_head,
            args.mamba_n_groups,
            args.mamba_d_state,
        )
        d_inner, conv_dim = args.mamba_d_inner, args.mamba_conv_dim
        h0, h1 = self.heads = _even(heads, n, r, "mamba_n_heads")
        if g % n == 0:
            self.groups = (r * g // n, (r + 1) * g // n)
        elif n % g == 0:  # a group's heads spread over n/g ranks
            self.groups = (r // (n // g), r // (n // g) + 1)
        else:
            raise _split_error(n, f"mamba_n_groups is {g}: neither a multiple nor a divisor of {n}")
        g0, g1 = self.groups
        x = (h0 * p, h1 * p)
        B = (d_inner + g0 * s, d_inner + g1 * s)
        C = (d_inner + g * s + g0 * s, d_inner + g * s + g1 * s)
        dt = (h0, h1)

        def shift(rng, by):
            return (rng[0] + by, rng[1] + by)

        in_proj = [
            x,
            shift(x, d_inner),
            shift(B, d_inner),
            shift(C, d_inner),
            shift(dt, d_inner + conv_dim),
        ]
        self._rule(r"\.mamba\.in_proj", "rows", in_proj, d_inner + conv_dim + heads)
        self._rule(r"\.mamba\.conv1d", "rows", [x, B, C], conv_dim)
        self.rules.append((re.compile(r"\.mamba\.(dt_bias|A_log|D)$"), "rows", [dt], heads))
        self._rule(r"\.mamba\.norm", "rows", [x], d_inner)
        self._rule(r"\.mamba\.out_proj", "cols", [x], d_inner)

    def shard(self) -> Shard:
        return Shard("tensor", self.rank, self.size, (0, self.args.num_hidden_layers), self.vocab)

    def local_name(self, name: str) -> str | None:
        return name

    def cut(self, name: str, w: mx.array) -> mx.array:
        if name.startswith(("model.embed_tokens.", "lm_head.")):
            return self._head_rows(w)
        for pattern, how, ranges, total in self.rules:
            if not pattern.search(name):
                continue
            if how == "cols" and name.endswith(".bias"):
                # A bias after an all_sum: added once, by rank 0.
                return w if self.rank == 0 else mx.zeros_like(w)
            axis = -1 if how == "cols" else max(w.ndim - 2, 0)
            return _take(w, ranges, axis, total)
        return w

    def restructure(self, model: ShardedModel) -> None:
        args, comm = self.args, model.comm
        for layer in model.layers:
            layer.reduce = comm.all_sum
            if layer.kind == "attention":
                layer.self_attn.n_heads = self.q[1] - self.q[0]
                layer.self_attn.n_kv_heads = self.kv[1] - self.kv[0]
                continue
            m = layer.mamba
            m.n_heads = self.heads[1] - self.heads[0]
            m.n_groups = self.groups[1] - self.groups[0]
            m.d_inner = m.n_heads * m.head_dim
            m.conv_dim = m.d_inner + 2 * m.n_groups * m.d_state
            g = args.mamba_n_groups
            m.norm.group_dims = args.mamba_d_inner // g
            if g % self.size == 0:
                m.norm.n_groups = m.n_groups  # whole groups: the plain norm
            else:
                m.norm.n_groups = 1
                m.norm.sum_over_ranks = _group_sum(comm, g, self.groups[0])
        _cut_placeholders(model, self)


def _group_sum(comm: Comm, n_groups: int, group: int):
    """The sum over ranks of a per-group quantity (..., 1), for a rank inside `group`."""
    if n_groups == 1:
        return comm.all_sum
    slot = mx.arange(n_groups) == group

    def total(x: mx.array) -> mx.array:
        # Each rank fills its group's slot (others 0): one all_sum serves every group.
        return comm.all_sum(mx.where(slot, x, 0.0))[..., group : group + 1]

    return total


def _cut_placeholders(model: ShardedModel, plan: _Plan) -> None:
    """Give the model's (lazy, never evaluated) parameters this rank's shapes, so that
    quantization and the weight check see the shapes the rank's tensors have."""
    params = tree_flatten(model.parameters())
    model.update(tree_unflatten([(name, plan.cut(_global(plan, name), w)) for name, w in params]))


def _global(plan: _Plan, local_name: str) -> str:
    """The checkpoint name of a local parameter name (pipeline layers are renumbered)."""
    if isinstance(plan, _PipelinePlan):
        m = _LAYER.match(local_name)
        if m is not None:
            return f"model.layers.{int(m.group(1)) + plan.start}.{local_name[m.end() :]}"
    return local_name


# --------------------------------------------------------------------------
# Pipeline stages balanced by memory
# --------------------------------------------------------------------------


def layer_state_bytes(args: ModelArgs, kind: str, context: int, act_bytes: int) -> int:
    """A layer's cache for one sequence: Mamba2 conv window + float32 state, or K/V."""
    if kind == "mamba":
        conv = (args.mamba_d_conv - 1) * args.mamba_conv_dim * act_bytes
        return conv + args.mamba_n_heads * args.mamba_d_head * args.mamba_d_state * 4
    return 2 * args.num_key_value_heads * args.head_dim * act_bytes * context


def plan_stages(costs: list[int], fixed: list[int]) -> list[tuple[int, int]]:
    """Contiguous stages [start, stop) of the layers, one per rank, each non-empty,
    minimising the largest rank total (fixed[r] + its layers' costs)."""
    n, count = len(fixed), len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest possible maximum when ranks 0..k-1 hold layers 0..i-1.
    best = [[inf] * (count + 1) for _ in range(n + 1)]
    cut = [[0] * (count + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for i in range(k, count - (n - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], fixed[k - 1] + prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    stages, i = [], count
    for k in range(n, 0, -1):
        j = cut[k][i]
        stages.append((j, i))
        i = j
    return stages[::-1]


def _pipeline_stages(args: ModelArgs, header_bytes: dict[str, int], size: int, act_bytes: int):
    if size > args.num_hidden_layers:
        raise _split_error(
            size,
            f"it has {args.num_hidden_layers} layers, fewer than the ranks",
            "Use fewer ranks.",
        )
    costs = [0] * args.num_hidden_layers
    embed = head = 0
    for name, nbytes in header_bytes.items():
        m = _LAYER.match(name)
        if m is not None and int(m.group(1)) < len(costs):
            costs[int(m.group(1))] += nbytes
        elif name.startswith("model.embed_tokens."):
            embed += nbytes
        elif name.startswith("lm_head."):
            head += nbytes
    context = min(args.max_position_embeddings or BALANCE_CONTEXT, BALANCE_CONTEXT)
    for i, kind in enumerate(args.layer_types):
        costs[i] += layer_state_bytes(args, kind, context, act_bytes)
    rows = (head or embed) // size  # every rank's share of the output head
    fixed = [embed + (rows if head else 0)] + [rows] * (size - 1)
    return plan_stages(costs, fixed)


def rank_weight_bytes(
    args: ModelArgs,
    mode: str,
    size: int,
    dtype: mx.Dtype = mx.bfloat16,
    bits: int | None = None,
    group_size: int = 64,
) -> list[int]:
    """Each rank's weight bytes for a model of this config split `size` ways, computed
    from shapes alone (nothing is allocated): for planning, and to check the split."""
    check_mode(mode)
    model = Model(args)  # lazy: never evaluated
    model.set_dtype(dtype)
    if bits is not None:
        nn.quantize(
            model, group_size, bits, class_predicate=lambda _, m: hasattr(m, "to_quantized")
        )
    params = dict(tree_flatten(model.parameters()))
    if args.tie_word_embeddings:
        params = {k: v for k, v in params.items() if not k.startswith("lm_head.")}
    if mode == "pipeline":
        stages = _pipeline_stages(args, {k: v.nbytes for k, v in params.items()}, size, dtype.size)
        plans: list[_Plan] = [_PipelinePlan(args, r, size, stages) for r in range(size)]
    else:
        plans = [_TensorPlan(args, r, size) for r in range(size)]
    try:
        return [
            sum(plan.cut(k, v).nbytes for k, v in params.items() if plan.local_name(k) is not None)
            for plan in plans
        ]
    except _Unaligned:
        raise _split_error(
            size, f"a {bits}-bit weight does not split on its groups of {group_size}"
        ) from None


# --------------------------------------------------------------------------
# The sharded model
# --------------------------------------------------------------------------


class ShardedModel(Model):
    """One rank's part of a Granite model; called like `Model` on every rank."""

    def __init__(self, args: ModelArgs, plan: _Plan, comm: Comm):
        super().__init__(args)
        self.comm = comm
        self.shard = plan.shard()
        self.watchdog: Watchdog | None = None
        plan.restructure(self)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        if self.watchdog is not None:
            self.watchdog.pulse()
        return super().__call__(tokens, cache)

    @property
    def _head(self) -> nn.Module:
        return self.model.embed_tokens if self.args.tie_word_embeddings else self.lm_head

    def _activation_dtype(self) -> mx.Dtype:
        return self.model.norm.weight.dtype  # norms are never quantized

    def embed(self, tokens: mx.array) -> mx.array:
        comm, (v0, v1) = self.comm, self.shard.vocab
        if self.shard.mode == "pipeline":
            if comm.rank > 0:
                shape = (*tokens.shape, self.args.hidden_size)
                return comm.recv(shape, self._activation_dtype(), comm.rank - 1)
            return super().embed(tokens)
        local = tokens - v0
        inside = (local >= 0) & (local < v1 - v0)
        rows = self.model.embed_tokens(mx.where(inside, local, 0))
        rows = mx.where(inside[..., None], rows, 0)  # where, not *: keeps exact zeros
        return comm.all_sum(rows) * self.args.embedding_multiplier

    def stage_output(self, h: mx.array, cache) -> mx.array:
        comm = self.comm
        if self.shard.mode != "pipeline" or comm.size == 1:
            return h
        last = comm.size - 1
        if comm.rank < last:
            sent = comm.send(h.astype(self._activation_dtype()), comm.rank + 1)
            for c in cache or ():
                _depend_on(c, sent)
            h = mx.depends(mx.zeros_like(h), sent)
        gathered = comm.all_gather(h)  # (N * b, ...): the last stage's rows are the result
        b = h.shape[0]
        return gathered[last * b : (last + 1) * b]

    def logits(self, h: mx.array) -> mx.array:
        head, (v0, v1) = self._head, self.shard.vocab
        holds_all = head is self.model.get("embed_tokens") and head.weight.shape[0] != v1 - v0
        part = _rows_product(head, h, v0, v1) if holds_all else _product(head, h)
        part = part / self.args.logits_scaling  # (..., rows)
        vocab, per = self.args.vocab_size, -(-self.args.vocab_size // self.comm.size)
        part = mx.moveaxis(part, -1, 0)  # (rows, ...): all_gather stacks the first axis
        if part.shape[0] < per:  # the last rank's rows are fewer: pad to the common count
            part = mx.pad(part, [(0, per - part.shape[0])] + [(0, 0)] * (part.ndim - 1))
        full = self.comm.all_gather(part)[:vocab]  # (vocab, ...)
        return mx.moveaxis(full, 0, -1)


def _product(head: nn.Module, h: mx.array) -> mx.array:
    return head.as_linear(h) if hasattr(head, "as_linear") else head(h)


def _rows_product(embedding: nn.Module, h: mx.array, lo: int, hi: int) -> mx.array:
    """h @ embedding.weight[lo:hi].T for a (quantized) embedding holding every row."""
    if isinstance(embedding, nn.QuantizedEmbedding):
        biases = embedding.get("biases")
        return mx.quantized_matmul(
            h, embedding.weight[lo:hi], scales=embedding.scales[lo:hi],
            biases=None if biases is None else biases[lo:hi], transpose=True,
            group_size=embedding.group_size, bits=embedding.bits, mode=embedding.mode,
        )  # fmt: skip
    return h @ embedding.weight[lo:hi].T


_CACHE_ARRAYS = ("keys", "values", "conv_state", "ssm_state")


def _depend_on(cache, sent: mx.array) -> None:
    """Make a cache's arrays depend on the stage's send, so that evaluating the cache
    (a prefill chunk, whose logits nobody reads) also sends to the next stage."""
    for name in _CACHE_ARRAYS:
        value = getattr(cache, name, None)
        if value is not None:
            setattr(cache, name, mx.depends(value, sent))


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def init_group() -> mx.distributed.Group:
    """The group `mlx.launch` set up (size 1 when the program was started alone)."""
    try:
        return mx.distributed.init()
    except RuntimeError as e:
        raise ParallelError(
            f"Could not join the other ranks: {e}. Start every rank with mlx.launch (see the "
            "README's 'Several Macs')."
        ) from None


def _header_info(folder: Path) -> dict[str, tuple[Path, dict]]:
    from .loading import weight_files
    from .safetensors_check import check_safetensors

    info = {}
    for path in weight_files(folder):
        header = check_safetensors(path)
        for name, entry in header.items():
            if name != "__metadata__":
                info[name] = (path, entry)
    return info


def fingerprint(config: dict, mode: str, tensors: dict[str, tuple[Path, dict]]) -> bytes:
    """64 bytes: a digest of config.json + mode, and one of the weights (every tensor's
    name, dtype, shape and first 64 bytes of data: cheap, and enough to tell two
    checkpoints apart)."""
    conf = hashlib.sha256(json.dumps([config, mode], sort_keys=True, default=str).encode())
    by_file: dict[Path, list[str]] = {}
    for name, (path, _) in tensors.items():
        by_file.setdefault(path, []).append(name)
    samples = {}
    for path, names in by_file.items():
        with open(path, "rb") as f:
            data = 8 + int.from_bytes(f.read(8), "little")
            for name in names:
                start, stop = tensors[name][1]["data_offsets"]
                f.seek(data + start)
                samples[name] = f.read(min(64, stop - start))
    weights = hashlib.sha256()
    for name in sorted(tensors):
        entry = tensors[name][1]
        weights.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode() + samples[name])
    return conf.digest() + weights.digest()


def check_same_model(comm: Comm, digest: bytes) -> None:
    """Every rank must load the same checkpoint in the same mode."""
    if comm.size == 1:
        return
    mine = mx.array(list(digest), mx.uint8)
    try:
        everyone = comm.all_gather(mine).reshape(comm.size, len(digest))
        mx.eval(everyone)
    except RuntimeError as e:
        if is_peer_error(e):
            raise ParallelError(
                f"rank {comm.rank}: lost another rank while comparing models ({e}); it failed "
                "to start (see its error)."
            ) from None
        raise
    rows = [bytes(r) for r in everyone.tolist()]
    differ = []
    for r, row in enumerate(rows):
        if row[:32] != rows[0][:32]:
            differ.append(f"rank {r}'s config.json or parallel mode")
        elif row[32:] != rows[0][32:]:
            differ.append(f"rank {r}'s weights")
    if differ:
        raise SplitError(
            f"The ranks disagree on the model: {', '.join(differ)} differ from rank 0's. Give "
            "every rank the same checkpoint (copy the folder to each machine) and the same "
            "--parallel mode."
        )


def load_sharded(
    folder: Path,
    mode: str,
    dtype: str | mx.Dtype | None = None,
    group: mx.distributed.Group | None = None,
) -> ShardedModel:
    """This rank's part of the checkpoint in `folder` (see the module docstring)."""
    from .loading import (
        apply_quantization,
        cast_weights,
        check_weights,
        load_config,
        parse_dtype,
        quantization_of,
        read_weights,
    )
    from .weights import sanitize

    check_mode(mode)
    comm = Comm(group if group is not None else init_group())
    config = load_config(folder)
    args = ModelArgs.from_dict(config)
    tensors = _header_info(folder)
    check_same_model(comm, fingerprint(config, mode, tensors))
    dtype = parse_dtype(dtype)
    try:
        if mode == "pipeline":
            act = (dtype or _checkpoint_float(tensors)).size
            sizes = {
                name: e["data_offsets"][1] - e["data_offsets"][0]
                for name, (_, e) in tensors.items()
            }
            stages = _pipeline_stages(args, sizes, comm.size, act)
            plan: _Plan = _PipelinePlan(args, comm.rank, comm.size, stages)
        else:
            plan = _TensorPlan(args, comm.rank, comm.size)
        weights = sanitize(read_weights(folder), args)
        local = {}
        for name in list(weights):
            target = plan.local_name(name)
            w = weights.pop(name)
            if target is not None:
                local[target] = _cut_checked(plan, name, w, config)
        model = ShardedModel(args, plan, comm)
    except _Unaligned:  # raised for placeholders only if the checkpoint did not raise first
        raise _split_error(comm.size, "a weight does not split evenly") from None
    quant = quantization_of(config)
    if quant is not None:
        apply_quantization(model, local, plan.local_quantization(quant))
    local = cast_weights(local, dtype)
    check_weights(model, local, folder)
    for name, w in local.items():
        # One tensor at a time: its whole source is read, cut, and freed before the next.
        local[name] = mx.contiguous(w)
        mx.eval(local[name])
    model.load_weights(list(local.items()), strict=False)
    model.eval()
    share_seed(comm)
    return model


def _cut_checked(plan: _Plan, name: str, w: mx.array, config: dict) -> mx.array:
    try:
        return plan.cut(name, w)
    except _Unaligned:
        quant = (
            " (quantized: a cut must fall on a quantization group)"
            if "scales" in name or (w.dtype == mx.uint32)
            else ""
        )
        raise _split_error(
            plan.size, f"{name} {tuple(w.shape)} does not split evenly{quant}"
        ) from None


def _checkpoint_float(tensors: dict[str, tuple[Path, dict]]) -> mx.Dtype:
    names = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}
    norm = tensors.get("model.norm.weight")
    return names.get(norm[1]["dtype"], mx.bfloat16) if norm else mx.bfloat16


# --------------------------------------------------------------------------
# The engine in lockstep
# --------------------------------------------------------------------------

_STOP = -1


def _request_to_json(request) -> dict:
    """The parts of an engine Request that every rank needs, as JSON."""
    if request.logits_processors or request.constraint is not None or request.cache is not None:
        raise ParallelError(
            "A distributed engine replays each request on every rank, so it takes only what "
            "can be sent there: no logits_processors, constraint or cache (use the "
            "SamplingParams options, and the engine's prompt cache)."
        )
    return {
        "prompt": [int(t) for t in request.prompt], "max_tokens": request.max_tokens,
        "sampling": asdict(request.sampling), "stop": list(request.stop),
        "top_logprobs": request.top_logprobs,
        "context": None if request.context is None else [int(t) for t in request.context],
        "snapshot_at": [int(t) for t in request.snapshot_at],
        "allow_long_prompt": request.allow_long_prompt,
    }  # fmt: skip


def _request_from_json(data: dict) -> Request:
    return Request(**{**data, "sampling": SamplingParams(**data["sampling"])})


class LockstepEngine(Engine):
    """Rank 0's engine in a distributed run: each `step` first sends the requests and
    aborts made since the last one to the other ranks, which replay them on their own
    engine (`follow`) and discard its output; every rank then makes the same model
    calls in the same order. Requests whose seed is None get one drawn here, so
    sampling agrees. A prompt cache is allowed in tensor mode only: it evicts by the
    bytes it holds, which pipeline stages hold unequally. `shutdown` releases the others.
    """

    def __init__(self, model, tokenizer, comm: Comm | None = None, **engine_options: Any):
        self.comm = comm or getattr(model, "comm", None) or Comm(init_group())
        if self.comm.rank != 0:
            raise ParallelError("LockstepEngine runs on rank 0; the other ranks call follow().")
        _check_engine_options(model, engine_options)
        super().__init__(model, tokenizer, **engine_options)
        self._news: dict[str, list] = {"add": [], "abort": []}

    def add(self, request: Request) -> int:
        data = _request_to_json(request)
        if request.sampling.seed is None:
            request = replace(request, sampling=replace(request.sampling, seed=_draw_seed()))
            data["sampling"]["seed"] = request.sampling.seed
        rid = super().add(request)  # a bad request raises here, on rank 0 alone
        self._news["add"].append(data)
        return rid

    def abort(self, rid: int) -> None:
        super().abort(rid)
        self._news["abort"].append(rid)

    def step(self) -> list[tuple[int, GenerationResponse]]:
        news = json.dumps(self._news).encode() if any(self._news.values()) else b""
        self._news = {"add": [], "abort": []}
        _share(news, self.comm)
        _pulse(self.model)
        return super().step()

    def shutdown(self) -> None:
        """End every request, then let the other ranks return from `follow`."""
        self.close()
        _share(None, self.comm, length=_STOP)


def follow(model, tokenizer, comm: Comm | None = None, **engine_options: Any) -> int:
    """On every rank but 0: replay rank 0's `LockstepEngine` until it shuts down.
    Returns the number of steps taken."""
    comm = comm or getattr(model, "comm", None) or Comm(init_group())
    _check_engine_options(model, engine_options)
    engine = Engine(model, tokenizer, **engine_options)
    steps = 0
    while True:
        n, data = _share(None, comm)
        _pulse(model)
        if n == _STOP:
            return steps
        if n > 0:
            news = json.loads(data)
            for request in news["add"]:
                engine.add(_request_from_json(request))
            for rid in news["abort"]:
                engine.abort(rid)
        engine.step()  # the events are rank 0's to report
        steps += 1


def _pulse(model) -> None:
    """A step shared between the ranks proves they are in step, even an idle one (a
    server between requests) that calls no model."""
    watchdog = getattr(model, "watchdog", None)
    if watchdog is not None:
        watchdog.pulse()


def _check_engine_options(model, options: dict) -> None:
    shard = getattr(model, "shard", None)
    if options.get("prompt_cache") is not None and shard is not None and shard.mode == "pipeline":
        raise ParallelError(
            "A prompt cache evicts by the bytes it holds, which differ between pipeline "
            "stages, so the ranks would disagree on what it holds: use parallel='tensor' "
            "(every rank holds the same share) or no prompt cache."
        )


# --------------------------------------------------------------------------
# A rank that hangs
# --------------------------------------------------------------------------


class Watchdog:
    """Ends the process when no model call (or `pulse`) happened for `timeout` seconds.

    A rank that dies closes its sockets and the others get an error; a rank that hangs
    (a frozen machine, a cable pulled without a reset) leaves them waiting forever
    inside a collective, where Python cannot interrupt them: this thread can.
    """

    def __init__(self, timeout: float, rank: int, what: str = "granite-mlx"):
        self.timeout, self.rank, self.what = timeout, rank, what
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="granite-watchdog")

    def pulse(self) -> None:
        self._last = time.monotonic()

    def __enter__(self):
        self.pulse()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                sys.stderr.write(
                    f"{self.what}: error: rank {self.rank}: no progress for {idle:.0f} s: another "
                    "rank stopped answering (a hung process or a broken link). Stopping.\n"
                )
                sys.stderr.flush()
                os._exit(1)
