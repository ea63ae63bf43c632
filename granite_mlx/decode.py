"""The per-token decode step as one compiled MLX graph.

Small models are dominated by per-op overhead on a GPU: a Mamba2 layer's step is
a string of tiny element-wise ops. `mx.compile` fuses them and removes the Python
work per layer, but it needs arrays of stable shapes. So inside the step the
attention caches are fixed-capacity buffers written at a traced offset, with the
unused tail masked; the capacity grows outside the graph (in steps of 256), and
the step is re-traced only when it does (and when the number of rows changes).

Rows of a batch may be left-padded (the engine aligns rows of different lengths
on the right): the padded variant of the step takes each row's padding as one
more input, hides those positions from attention and rotates RoPE by each row's
own position. A cache without padding runs the plain variant, whose graph has
neither.

The uncompiled `Model.__call__` is the reference; tests prove both agree.
"""

from __future__ import annotations

import os

import mlx.core as mx

from .cache import Cache, KVCache, MambaCache


def reference_forced() -> bool:
    """GRANITE_MLX_REFERENCE=1 forces the plain path: no compiled step, no kernels."""
    return os.environ.get("GRANITE_MLX_REFERENCE", "") not in ("", "0")


class _FixedKV:
    """A KV cache seen from inside the compiled step: fixed-capacity buffers written
    at a traced offset (an array), so every token runs the same graph."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array, positions: mx.array):
        self.keys, self.values, self.offset, self.positions = keys, values, offset, positions

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, k, self.offset[None], axes=(2,))
        self.values = mx.slice_update(self.values, v, self.offset[None], axes=(2,))
        return self.keys, self.values


class _State:
    """A Mamba2 cache seen from inside the compiled step."""

    def __init__(self, conv_state: mx.array, ssm_state: mx.array):
        self.conv_state, self.ssm_state, self.offset = conv_state, ssm_state, 0


class CompiledDecoder:
    """`decoder(token (b, 1), cache) -> logits (b, 1, vocab)`, updating `cache`,
    for a cache whose buffers exist (it has seen a token, or `cache.allocate` made them)."""

    def __init__(self, model):
        self.model = model
        for _, m in model.named_modules():
            if hasattr(m, "prepare_transposed"):
                m.prepare_transposed()
        self._check_kernel()
        self._step = mx.compile(self._graph)
        self._padded_step = mx.compile(self._padded_graph)

    def _check_kernel(self) -> None:
        """Run the fused kernel's one-time self-check now: it evaluates arrays,
        which cannot happen inside the compiled step's trace."""
        from .ssm import check_decode_kernel

        mixer = next((layer.mamba for layer in self.model.layers if layer.kind == "mamba"), None)
        if mixer is None or reference_forced():
            return
        activations = self.model.model.norm.weight.dtype  # norms are never quantized
        check_decode_kernel(
            mixer.n_heads, mixer.head_dim, mixer.d_state, mixer.n_groups, mixer.d_conv,
            activations, mixer.conv1d.weight.dtype,
        )  # fmt: skip

    @staticmethod
    def usable(cache: Cache | None) -> bool:
        if not cache or reference_forced():
            return False
        for c in cache:
            if isinstance(c, KVCache) and c.keys is None:
                return False
            if isinstance(c, MambaCache) and c.ssm_state is None:
                return False
        return True

    def __call__(self, token: mx.array, cache: Cache) -> mx.array:
        offset = cache[0].offset
        arrays = []
        for c in cache:
            if isinstance(c, KVCache):
                c.reserve(offset + 1)
                arrays += [c.keys, c.values]
            else:
                arrays += [c.conv_state, c.ssm_state]
        left = cache[0].left_padding
        if left is None:
            logits, *new = self._step(token, mx.array(offset, mx.int32), *arrays)
        else:
            logits, *new = self._padded_step(token, mx.array(offset, mx.int32), left, *arrays)
        for i, c in enumerate(cache):
            a, b = new[2 * i], new[2 * i + 1]
            if isinstance(c, KVCache):
                c.keys, c.values = a, b
            else:
                c.conv_state, c.ssm_state = a, b
            c.offset = offset + 1
        return logits

    def _graph(self, token: mx.array, offset: mx.array, *arrays: mx.array):
        return self._layers(token, offset, None, arrays)

    def _padded_graph(self, token: mx.array, offset: mx.array, left: mx.array, *arrays: mx.array):
        return self._layers(token, offset, left, arrays)

    def _layers(self, token: mx.array, offset: mx.array, left: mx.array | None, arrays):
        model = self.model
        shims = []
        capacity = None
        positions = offset if left is None else offset - left  # (b,) with padding
        for i, layer in enumerate(model.layers):
            a, b = arrays[2 * i], arrays[2 * i + 1]
            if layer.kind == "mamba":
                shims.append(_State(a, b))
            else:
                shims.append(_FixedKV(a, b, offset, positions))
                capacity = a.shape[2]
        mask = None
        if capacity is not None:
            keys = mx.arange(capacity)
            if left is None:
                mask = (keys <= offset)[None, None, None, :]  # (1,1,1,cap)
            else:
                visible = (keys[None] <= offset) & (keys[None] >= left[:, None])  # (b,cap)
                mask = visible[:, None, None, :]  # (b,1,1,cap)
        h = model.embed(token[:, 0])  # (b, hidden)
        for layer, shim in zip(model.layers, shims):
            h = layer.step(h, shim, mask)
        logits = model.logits(model.model.norm(model.stage_output(h, shims)))[:, None]
        out = [logits]
        for shim in shims:
            if isinstance(shim, _FixedKV):
                out += [shim.keys, shim.values]
            else:
                out += [shim.conv_state, shim.ssm_state]
        return out
