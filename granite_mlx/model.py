"""The Granite 4.0 decoder (`granitemoehybrid`) in MLX.

One file, in the manner of mlx-lm's models: module attributes carry the
checkpoint's weight names (`in_proj`, `conv1d`, `A_log`, `shared_mlp.input_linear`,
`block_sparse_moe.router.layer`, ...), so loading is a plain name match after
`granite_mlx.weights.sanitize`.

    h = embed(ids) * embedding_multiplier
    for each layer:
        h = h + residual_multiplier * mixer(rmsnorm(h))        # Mamba2 or attention
        n = rmsnorm(h)
        h = h + residual_multiplier * (moe(n) + shared_mlp(n))
    logits = head(rmsnorm(h)) / logits_scaling
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from . import ssm
from .cache import Cache, KVCache, MambaCache, StepRecord
from .config import ModelArgs
from .decode import CompiledDecoder


class Linear(nn.Linear):
    """nn.Linear that can multiply by a transposed view of its weight evaluated
    ahead of time (`prepare_transposed`): the same bytes, no copy, but no
    Transpose primitive in every decode step's graph."""

    def prepare_transposed(self) -> None:
        wt = self.weight.T
        mx.eval(wt)
        object.__setattr__(self, "_wt", (self.weight, wt))

    def __call__(self, x: mx.array) -> mx.array:
        cached = self.__dict__.get("_wt")
        if cached is None or cached[0] is not self.weight:  # weights replaced since
            return super().__call__(x)
        if "bias" in self:
            return mx.addmm(self.bias, x, cached[1])
        return x @ cached[1]


class RMSNormGated(nn.Module):
    """rmsnorm(y * silu(z)) * weight, in float32, the RMS taken per group of d_inner
    (as the reference does; one group in every released checkpoint).

    Tensor parallel (granite_mlx.parallel), a rank may hold only part of its
    group's channels: `sum_over_ranks` then adds up the ranks' sums of squares,
    and the mean divides by the whole group's width, `group_dims`.
    """

    def __init__(self, dims: int, n_groups: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.n_groups = n_groups
        self.eps = eps
        self.sum_over_ranks = None
        self.group_dims = dims // n_groups

    def __call__(self, y: mx.array, z: mx.array) -> mx.array:
        y = y.astype(mx.float32) * nn.silu(z.astype(mx.float32))
        if self.sum_over_ranks is not None:
            squares = self.sum_over_ranks(mx.sum(y * y, axis=-1, keepdims=True))
            scale = mx.rsqrt(squares / self.group_dims + self.eps)
            return y * scale * self.weight.astype(mx.float32)
        if self.n_groups == 1:
            return mx.fast.rms_norm(y, self.weight.astype(mx.float32), self.eps)
        *lead, d = y.shape
        y = y.reshape(*lead, self.n_groups, d // self.n_groups)
        y = mx.fast.rms_norm(y, None, self.eps).reshape(*lead, d)
        return y * self.weight.astype(mx.float32)


class DepthwiseConv(nn.Module):
    """The Mamba2 causal conv's parameters: weight (conv_dim, k), bias (conv_dim,).

    Hub checkpoints store the weight as (conv_dim, 1, k) and mlx-lm ones as
    (conv_dim, k, 1); `weights.sanitize` squeezes both to this.
    """

    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = mx.zeros((channels, kernel))
        if bias:
            self.bias = mx.zeros((channels,))


class Mamba2Mixer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.mamba_n_heads
        self.head_dim = args.mamba_d_head
        self.n_groups = args.mamba_n_groups
        self.d_state = args.mamba_d_state
        self.d_conv = args.mamba_d_conv
        self.d_inner = args.mamba_d_inner
        self.conv_dim = args.mamba_conv_dim
        self.chunk_size = args.mamba_chunk_size
        self.time_step_limit = tuple(args.time_step_limit)
        self.in_proj = Linear(
            args.hidden_size, self.d_inner + self.conv_dim + self.n_heads, bias=args.mamba_proj_bias
        )
        self.conv1d = DepthwiseConv(self.conv_dim, self.d_conv, args.mamba_conv_bias)
        # Kept in float32 whatever the model dtype: they enter exp() and the state.
        self.dt_bias = mx.ones((self.n_heads,))
        self.A_log = mx.zeros((self.n_heads,))
        self.D = mx.ones((self.n_heads,))
        self.norm = RMSNormGated(self.d_inner, self.n_groups, args.rms_norm_eps)
        self.out_proj = Linear(self.d_inner, args.hidden_size, bias=args.mamba_proj_bias)

    def __call__(
        self, x: mx.array, cache: MambaCache | None = None, pad_mask: mx.array | None = None
    ) -> mx.array:
        """Prefill (or any l > 1): the chunked scan. x: (b, l, hidden)."""
        b, l, _ = x.shape
        if l == 1 and pad_mask is None:
            return self.step(x[:, 0], cache)[:, None]
        z, xBC, dt = mx.split(self.in_proj(x), [self.d_inner, self.d_inner + self.conv_dim], axis=-1)
        A = -mx.exp(self.A_log.astype(mx.float32))
        conv_state = cache.conv_state if cache is not None else None
        state = initial_state = cache.ssm_state if cache is not None else None
        if pad_mask is not None:
            # Padding must not reach the conv window or the state (left-padded batches).
            xBC = mx.where(pad_mask[..., None], xBC, 0)  # where, not *: 0 * NaN is NaN
        if conv_state is None:
            conv_state = mx.zeros((b, self.d_conv - 1, self.conv_dim), xBC.dtype)
        window = mx.concatenate([conv_state.astype(xBC.dtype), xBC], axis=1)  # (b,l+k-1,ch)
        conv_state = window[:, -(self.d_conv - 1) :]
        xBC = nn.silu(
            ssm.depthwise_causal_conv(window, self.conv1d.weight, getattr(self.conv1d, "bias", None))
        )  # (b,l,ch) float32
        dt = ssm.discretize_dt(dt, self.dt_bias, self.time_step_limit)  # (b,l,h)
        if pad_mask is not None:
            xBC = mx.where(pad_mask[..., None], xBC, 0.0)
            dt = mx.where(pad_mask[..., None], dt, 0.0)  # dt = 0 leaves the state untouched
        xs, B, C = mx.split(xBC, [self.d_inner, self.d_inner + self.n_groups * self.d_state], axis=-1)
        y, state = ssm.selective_scan(
            xs.reshape(b, l, self.n_heads, self.head_dim),
            dt,
            A,
            B.reshape(b, l, self.n_groups, self.d_state),
            C.reshape(b, l, self.n_groups, self.d_state),
            self.D,
            self.chunk_size,
            state,
        )
        if cache is not None:
            if cache.record:  # speculative verification may undo part of this call
                cache.recorded = StepRecord(
                    cache.offset, window, xs.reshape(b, l, self.n_heads, self.head_dim), dt, A,
                    B.reshape(b, l, self.n_groups, self.d_state), initial_state, (conv_state, state),
                )  # fmt: skip
            cache.conv_state, cache.ssm_state = conv_state, state
            cache.offset += l
        y = self.norm(y.reshape(b, l, self.d_inner), z)
        return self.out_proj(y.astype(x.dtype))

    def step(self, x: mx.array, cache: MambaCache | None = None) -> mx.array:
        """Decode one token: the exact one-step recurrence. x: (b, hidden) -> (b, hidden)."""
        b = x.shape[0]
        z, xBC, dt = mx.split(self.in_proj(x), [self.d_inner, self.d_inner + self.conv_dim], axis=-1)
        conv_state = cache.conv_state if cache is not None else None
        state = cache.ssm_state if cache is not None else None
        if conv_state is None:
            conv_state = mx.zeros((b, self.d_conv - 1, self.conv_dim), xBC.dtype)
        if state is None:
            state = mx.zeros((b, self.n_heads, self.head_dim, self.d_state), mx.float32)
        y, conv_state, state = ssm.decode_step(
            xBC, conv_state, self.conv1d.weight, getattr(self.conv1d, "bias", None), dt,
            self.dt_bias, -mx.exp(self.A_log), self.D, state, self.time_step_limit, self.n_groups,
        )  # fmt: skip
        if cache is not None:
            cache.conv_state, cache.ssm_state = conv_state, state
            cache.offset += 1
        return self.out_proj(self.norm(y.reshape(b, self.d_inner), z).astype(x.dtype))


class Attention(nn.Module):
    """GQA with softmax scale `attention_multiplier`; RoPE or no positions at all (NoPE)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.softmax_scale
        bias = args.attention_bias
        self.q_proj = Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        self.rope = None
        if args.position_embedding_type == "rope":
            factor = float((args.rope_scaling or {}).get("factor", 1.0))
            self.rope = nn.RoPE(self.head_dim, traditional=False, base=args.rope_theta, scale=1 / factor)

    def __call__(self, x: mx.array, cache: KVCache | None = None, mask=None) -> mx.array:
        b, l, _ = x.shape
        q = self.q_proj(x).reshape(b, l, self.n_heads, -1).transpose(0, 2, 1, 3)  # (b,nh,l,hd)
        k = self.k_proj(x).reshape(b, l, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, l, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if self.rope is not None:
            offset = cache.positions if cache is not None else 0
            q = self.rope(q, offset=offset)
            k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if _blocked_attention_pays(q, k, mask):
            o = blocked_causal_attention(q, k, v, self.scale)
        else:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(b, l, -1))

    def step(self, x: mx.array, cache: KVCache, mask=None) -> mx.array:
        """Decode one token. x: (b, hidden) -> (b, hidden); with one position the
        head split is a plain reshape, no transpose."""
        b = x.shape[0]
        q = self.q_proj(x).reshape(b, self.n_heads, 1, self.head_dim)
        k = self.k_proj(x).reshape(b, self.n_kv_heads, 1, self.head_dim)
        v = self.v_proj(x).reshape(b, self.n_kv_heads, 1, self.head_dim)
        if self.rope is not None:
            q = self.rope(q, offset=cache.positions)
            k = self.rope(k, offset=cache.positions)
        k, v = cache.update_and_fetch(k, v)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(o.reshape(b, -1))


KEY_BLOCK = 512


def _blocked_attention_pays(q: mx.array, k: mx.array, mask) -> bool:
    # The CPU's attention materialises (heads, queries, keys) scores in float32;
    # past a few MB that dominates a long prefill's memory. GPUs run a fused kernel.
    return (
        mask == "causal" if isinstance(mask, str) else False
    ) and mx.default_device() == mx.cpu and k.shape[2] > KEY_BLOCK


def blocked_causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal attention over key blocks with an online softmax: memory grows with
    one block of scores, not the whole context.

    q: (b, nh, l, hd), the last l of the s positions in k, v: (b, kvh, s, hd).
    """
    b, nh, l, hd = q.shape
    kvh, s = k.shape[1], k.shape[2]
    q = (q.astype(mx.float32) * scale).reshape(b, kvh, nh // kvh, l, hd)  # (b,kvh,rep,l,hd)
    query_pos = (s - l + mx.arange(l))[:, None]  # (l, 1)
    m = mx.full((b, kvh, nh // kvh, l, 1), -mx.inf)
    total = mx.zeros((b, kvh, nh // kvh, l, 1))
    acc = mx.zeros((b, kvh, nh // kvh, l, v.shape[-1]))
    for j in range(0, s, KEY_BLOCK):
        kb = k[:, :, None, j : j + KEY_BLOCK].astype(mx.float32)  # (b,kvh,1,kb,hd)
        vb = v[:, :, None, j : j + KEY_BLOCK].astype(mx.float32)
        scores = q @ kb.swapaxes(-1, -2)  # (b,kvh,rep,l,kb)
        visible = (j + mx.arange(kb.shape[3]))[None, :] <= query_pos  # (l, kb)
        scores = mx.where(visible, scores, -mx.inf)
        m_new = mx.maximum(m, scores.max(axis=-1, keepdims=True))
        # Rows with no visible key yet keep m = -inf; exp(-inf - -inf) must read 0.
        safe = mx.where(m_new == -mx.inf, 0.0, m_new)
        p = mx.exp(scores - safe)
        correction = mx.exp(m - safe)
        total = total * correction + p.sum(axis=-1, keepdims=True)
        acc = acc * correction + p @ vb
        m = m_new
        # One block's scores at a time: left lazy, the graph may hold several.
        # (This path runs in prefill only, never inside the compiled decode step.)
        mx.eval(m, total, acc)
    return (acc / total).reshape(b, nh, l, -1).astype(v.dtype)


class MLP(nn.Module):
    """input_linear gives 2I outputs: silu(first half) * second half -> output_linear."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.input_linear = Linear(hidden, 2 * intermediate, bias=False)
        self.output_linear = Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.input_linear(x), 2, axis=-1)
        return self.output_linear(nn.silu(gate) * up)


class ExpertsLinear(nn.Module):
    """Stacked expert matrices, weight (experts, out, in), applied through gather_mm."""

    def __init__(self, experts: int, in_dims: int, out_dims: int):
        super().__init__()
        self.weight = mx.zeros((experts, out_dims, in_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        w = self.weight
        if x.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX's CPU gather_mm takes float32 only; GPUs run the model dtype.
            return mx.gather_mm(
                x.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2),
                rhs_indices=indices, sorted_indices=sorted_indices,
            ).astype(x.dtype)  # fmt: skip
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedExpertsLinear.from_float(self, group_size, bits, mode)


class QuantizedExpertsLinear(nn.Module):
    def __init__(self, experts: int, in_dims: int, out_dims: int, group_size: int, bits: int,
                 mode: str = "affine"):  # fmt: skip
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w = mx.zeros((experts, out_dims, in_dims))
        self.weight, self.scales, *rest = mx.quantize(w, group_size, bits, mode=mode)
        if rest:
            self.biases = rest[0]
        self.freeze()

    @classmethod
    def from_float(cls, layer: ExpertsLinear, group_size: int, bits: int, mode: str):
        e, out_dims, in_dims = layer.weight.shape
        q = cls(e, in_dims, out_dims, group_size, bits, mode)
        q.weight, q.scales, *rest = mx.quantize(layer.weight, group_size, bits, mode=mode)
        if rest:
            q.biases = rest[0]
        return q

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x, self.weight, self.scales, self.get("biases"), rhs_indices=indices, transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode,
            sorted_indices=sorted_indices,
        )  # fmt: skip


class Router(nn.Module):
    def __init__(self, hidden: int, experts: int):
        super().__init__()
        self.layer = Linear(hidden, experts, bias=False)


class MoE(nn.Module):
    """Top-k experts: router logits in float32, softmax over the k chosen only."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.router = Router(args.hidden_size, args.num_local_experts)
        self.input_linear = ExpertsLinear(
            args.num_local_experts, args.hidden_size, 2 * args.intermediate_size
        )
        self.output_linear = ExpertsLinear(
            args.num_local_experts, args.intermediate_size, args.hidden_size
        )

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (t, H)
        k = self.top_k
        logits = self.router.layer(x).astype(mx.float32)  # (t, E)
        idx = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]  # (t, k)
        weights = mx.softmax(mx.take_along_axis(logits, idx, axis=-1), axis=-1)
        t = x.shape[0]
        if t * k >= 64:
            # Many tokens: group rows by expert so each expert's matrix is read once.
            flat = idx.flatten()
            order = mx.argsort(flat)
            inv = mx.argsort(order)
            xs = x[order // k][:, None]  # (t*k, 1, H)
            h = self._experts(xs, flat[order], True)  # (t*k, 1, H)
            h = h[inv].reshape(t, k, -1)
        else:
            h = self._experts(x[:, None, None], idx, False).squeeze(-2)  # (t, k, H)
        y = (h.astype(mx.float32) * weights[..., None]).sum(axis=1)
        return y.astype(x.dtype).reshape(shape)

    def _experts(self, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
        gate, up = mx.split(self.input_linear(x, idx, sorted_indices), 2, axis=-1)
        return self.output_linear(nn.silu(gate) * up, idx, sorted_indices)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str):
        super().__init__()
        self.kind = kind
        # Tensor parallel (granite_mlx.parallel): each rank's mixer and MLP give a
        # partial sum of the block's output; `reduce` adds them up over the ranks.
        self.reduce = None
        self.residual_multiplier = args.residual_multiplier
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if kind == "mamba":
            self.mamba = Mamba2Mixer(args)
        else:
            self.self_attn = Attention(args)
        self.shared_mlp = MLP(args.hidden_size, args.shared_intermediate_size)
        if args.use_moe:
            self.block_sparse_moe = MoE(args)

    def __call__(self, x: mx.array, cache=None, mask=None, pad_mask=None) -> mx.array:
        n = self.input_layernorm(x)
        if self.kind == "mamba":
            h = self.mamba(n, cache, pad_mask)
        else:
            h = self.self_attn(n, cache, mask)
        return self._mlp(x + self.residual_multiplier * self._reduce(h))

    def step(self, x: mx.array, cache, mask=None) -> mx.array:
        """Decode one token, x: (b, hidden) (see the mixers' `step`)."""
        n = self.input_layernorm(x)
        if self.kind == "mamba":
            h = self.mamba.step(n, cache)
        else:
            h = self.self_attn.step(n, cache, mask)
        return self._mlp(x + self.residual_multiplier * self._reduce(h))

    def _mlp(self, x: mx.array) -> mx.array:
        n = self.post_attention_layernorm(x)
        h = self.shared_mlp(n)
        if "block_sparse_moe" in self:
            h = h + self.block_sparse_moe(n)
        return x + self.residual_multiplier * self._reduce(h)

    def _reduce(self, h: mx.array) -> mx.array:
        return h if self.reduce is None else self.reduce(h)


class GraniteModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, kind) for kind in args.layer_types]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    """`model(tokens (b, l), cache=None) -> logits (b, l, vocab)`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = GraniteModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        # Decode one token through one compiled graph (granite_mlx.decode); False
        # runs the plain modules, the reference it is tested against.
        self.compiled_decode = True
        self._decoder = None

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self, left_padding: list[int] | None = None) -> Cache:
        """One cache per layer. `left_padding` (one count per batch row) marks
        leading pad tokens of a left-padded batch, kept out of attention and state."""
        return [
            MambaCache(left_padding) if layer.kind == "mamba" else KVCache(left_padding)
            for layer in self.layers
        ]

    def __call__(self, tokens: mx.array, cache: Cache | None = None) -> mx.array:
        if tokens.shape[1] == 1 and self.compiled_decode and CompiledDecoder.usable(cache):
            if self._decoder is None:
                self._decoder = CompiledDecoder(self)
            return self._decoder(tokens, cache)
        return self.logits(self.hidden_states(tokens, cache))

    def embed(self, tokens: mx.array) -> mx.array:
        """Token ids (b, l) -> the first layer's input (b, l, hidden)."""
        return self.model.embed_tokens(tokens) * self.args.embedding_multiplier

    def stage_output(self, h: mx.array, cache) -> mx.array:
        """The hidden states after this process's layers -> after all layers.

        The same here; a pipeline stage (granite_mlx.parallel) passes them on to
        the next stage and receives the last stage's.
        """
        return h

    def hidden_states(self, tokens: mx.array, cache: Cache | None = None) -> mx.array:
        """The final-normed hidden states (b, l, hidden)."""
        h = self.embed(tokens)
        l = tokens.shape[1]
        offset = cache[0].offset if cache else 0
        pad_mask, mask = None, ("causal" if l > 1 else None)
        left = cache[0].left_padding if cache else None
        if left is not None and offset < cache[0].left_max:
            positions = offset + mx.arange(l)
            pad_mask = positions[None, :] >= left[:, None]  # (b, l): real tokens
        if left is not None:
            keys = mx.arange(offset + l)[None, None, :]
            queries = (offset + mx.arange(l))[None, :, None]
            allowed = (keys <= queries) & (keys >= left[:, None, None])  # (b, l, s)
            # A pad query would see no key at all, and its softmax would be NaN, which
            # 0-weights cannot stop from spreading (0 * NaN = NaN): let it see itself.
            mask = (allowed | (keys == queries))[:, None]  # (b, 1, l, s)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache else None, mask, pad_mask)
        return self.model.norm(self.stage_output(h, cache))

    def logits(self, h: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            out = self.model.embed_tokens.as_linear(h)
        else:
            out = self.lm_head(h)
        return out / self.args.logits_scaling
