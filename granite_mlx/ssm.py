"""The Mamba2 selective scan: a chunked SSD prefill, the exact one-step decode, and
a plain sequential recurrence that both are tested against.

Glossary (shapes in docstrings use these letters):
    b  batch                      l  sequence length
    h  SSM heads (mamba_n_heads)  p  head dim (mamba_d_head)
    g  groups (mamba_n_groups)    n  state size (mamba_d_state)
    c  chunks                     q  chunk length (mamba_chunk_size)
    k  conv kernel (mamba_d_conv)

Per head, with state S (p x n) kept in float32:
    S_t = exp(dt_t * A) * S_{t-1} + dt_t * outer(x_t, B_t)
    y_t = S_t @ C_t + D * x_t
Head h reads group h // (h / g) of B and C.

`selective_scan` and `decode_step` are the single dispatch points: fused kernels
(granite_mlx.kernels) plug in there without the model knowing. This module owns
the dispatch and the oracle: it hands `decode_step_reference` to the kernel
module for its self-check, and the kernel module never imports this one.
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from .kernels import ssm_step as _fused


def softplus(x: mx.array) -> mx.array:
    # Same threshold as torch's softplus: linear above 20.
    return mx.where(x > 20.0, x, mx.log1p(mx.exp(mx.minimum(x, 20.0))))


def discretize_dt(dt: mx.array, dt_bias: mx.array, limit: tuple[float, float]) -> mx.array:
    """softplus(dt + dt_bias) in float32, clamped to `time_step_limit`. dt: (..., h)."""
    dt = softplus(dt.astype(mx.float32) + dt_bias.astype(mx.float32))
    lo, hi = limit
    if lo > 0.0 or hi != float("inf"):
        dt = mx.clip(dt, lo, hi)
    return dt


def _segsum(a: mx.array) -> mx.array:
    """Stable segment sums: out[..., i, j] = sum(a[..., j+1 : i+1]) for i >= j, else -inf.

    a: (..., q) -> (..., q, q). Summing the masked terms directly (rather than
    differencing a cumulative sum) keeps full float32 precision near the diagonal,
    where exp() of the result is close to 1 and matters most.
    """
    q = a.shape[-1]
    idx = mx.arange(q)
    strict = idx[:, None] > idx[None, :]  # (i=k, j): term k counts for column j when k > j
    terms = mx.where(strict, mx.expand_dims(a, -1), 0.0)  # (..., k, j)
    sums = mx.cumsum(terms, axis=-2)  # (..., i, j)
    lower = idx[:, None] >= idx[None, :]
    return mx.where(lower, sums, -mx.inf)


def ssd_chunked_scan(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array,
    chunk_size: int,
    initial_state: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Prefill by SSD, linear in l: exact attention-like blocks inside each chunk,
    the recurrence carried between chunks.

    x: (b, l, h, p)   dt: (b, l, h) discretized, float32   A: (h,) float32 (negative)
    B, C: (b, l, g, n)   D: (h,)   initial_state: (b, h, p, n) float32 or None
    Returns y (b, l, h, p) float32 and the final state (b, h, p, n) float32.
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    hg = h // g
    q = min(chunk_size, l)
    pad = (-l) % q
    x = x.astype(mx.float32)
    B = B.astype(mx.float32)
    C = C.astype(mx.float32)
    skip = x * D.astype(mx.float32)[:, None]
    if pad:
        # dt = 0 on padding: decay exp(0) = 1 and no input, so the state passes
        # through the padded steps unchanged and the final state stays exact.
        x, dt, B, C = (mx.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in (x, dt, B, C))
    c = (l + pad) // q

    # 1. Into chunks, heads split as (g, hg) so B and C broadcast per group.
    xdt = (x * dt[..., None]).reshape(b, c, q, g, hg, p).transpose(0, 1, 3, 4, 2, 5)  # (b,c,g,hg,q,p)
    a = (dt * A).reshape(b, c, q, g, hg).transpose(0, 1, 3, 4, 2)  # (b,c,g,hg,q)
    B = B.reshape(b, c, q, g, n).transpose(0, 1, 3, 2, 4)[:, :, :, None]  # (b,c,g,1,q,n)
    C = C.reshape(b, c, q, g, n).transpose(0, 1, 3, 2, 4)[:, :, :, None]  # (b,c,g,1,q,n)
    a_cum = mx.cumsum(a, axis=-1)  # (b,c,g,hg,q)

    # 2. Inside each chunk: masked, decayed C.B^T applied to x*dt.
    decay = mx.exp(_segsum(a))  # (b,c,g,hg,q,q)
    scores = (C @ B.swapaxes(-1, -2)) * decay  # (b,c,g,hg,q,q)
    y = scores @ xdt  # (b,c,g,hg,q,p)

    # 3. The state each chunk leaves behind, as if it started from zero. The decay
    # from each position to the chunk's end is the segment sum's last row, summed
    # term by term; exp(a_cum[-1] - a_cum) would difference two large sums and
    # lose up to 6e-4 relative under strong decay.
    to_end = decay[..., -1, :]  # (b,c,g,hg,q)
    chunk_states = (xdt * to_end[..., None]).swapaxes(-1, -2) @ B  # (b,c,g,hg,p,n)

    # 4. Carry the state across chunks: a short sequential loop, one step per chunk.
    state = (
        mx.zeros((b, g, hg, p, n), mx.float32)
        if initial_state is None
        else initial_state.astype(mx.float32).reshape(b, g, hg, p, n)
    )
    chunk_decay = mx.exp(a_cum[..., -1])  # (b,c,g,hg)
    starts = []
    for i in range(c):
        starts.append(state)
        state = state * chunk_decay[:, i, ..., None, None] + chunk_states[:, i]
    start_states = mx.stack(starts, axis=1)  # (b,c,g,hg,p,n)

    # 5. What the carried-in state contributes to each position.
    y = y + (C @ start_states.swapaxes(-1, -2)) * mx.exp(a_cum)[..., None]  # (b,c,g,hg,q,p)

    y = y.transpose(0, 1, 4, 2, 3, 5).reshape(b, c * q, h, p)[:, :l]  # (b,l,h,p)
    return y + skip, state.reshape(b, h, p, n)


def sequential_scan(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array,
    initial_state: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """The recurrence one step at a time: the plain reference for the chunked scan.

    Same arguments and results as `ssd_chunked_scan` (without chunk_size).
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    state = mx.zeros((b, h, p, n), mx.float32) if initial_state is None else initial_state
    ys = []
    for t in range(l):
        y, state = ssm_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return mx.stack(ys, axis=1), state


def state_after(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    initial_state: mx.array | None = None,
) -> mx.array:
    """The state after the last of l positions, without their outputs y.

    Closed form of l steps of the recurrence (step 3 of `ssd_chunked_scan`
    plus the decayed initial state): one product of (p x l) by (l x n) per head.
    Speculative decoding uses it to set the state after any verified position
    from the inputs of one multi-token pass. Arguments as `ssd_chunked_scan`;
    returns (b, h, p, n) float32.
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    a_cum = mx.cumsum(dt * A, axis=1)  # (b,l,h)
    w = dt * mx.exp(a_cum[:, -1:] - a_cum)  # (b,l,h): each input's weight at the end
    xw = (x.astype(mx.float32) * w[..., None]).reshape(b, l, g, h // g, p)
    xw = xw.transpose(0, 2, 3, 4, 1)  # (b,g,hg,p,l)
    B = B.astype(mx.float32).transpose(0, 2, 1, 3)[:, :, None]  # (b,g,1,l,n)
    state = (xw @ B).reshape(b, h, p, n)
    if initial_state is not None:
        state = state + mx.exp(a_cum[:, -1])[..., None, None] * initial_state
    return state


def ssm_update(
    state: mx.array, x: mx.array, dt: mx.array, A: mx.array, B: mx.array, C: mx.array, D: mx.array
) -> tuple[mx.array, mx.array]:
    """One token of the recurrence.

    state: (b, h, p, n) float32   x: (b, h, p)   dt: (b, h) discretized   A: (h,)
    B, C: (b, g, n)   D: (h,)  ->  y (b, h, p) float32, new state (b, h, p, n)
    """
    h, g = x.shape[1], B.shape[1]
    x = x.astype(mx.float32)
    decay = mx.exp(dt * A)[..., None, None]  # (b,h,1,1)
    B = mx.repeat(B.astype(mx.float32), h // g, axis=1)[:, :, None, :]  # (b,h,1,n)
    C = mx.repeat(C.astype(mx.float32), h // g, axis=1)[..., None]  # (b,h,n,1)
    state = state * decay + (dt[..., None] * x)[..., None] * B  # (b,h,p,n)
    y = (state @ C).squeeze(-1) + D.astype(mx.float32)[:, None] * x
    return y, state


def selective_scan(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array,
    chunk_size: int,
    initial_state: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """The prefill dispatch point (see `ssd_chunked_scan` for shapes).

    The chunk length is free (every length gives the same result, to rounding):
    on the CPU 64 is both faster and lighter than the checkpoints' 256 (measured:
    0.30 s and 46 MiB against 0.53 s and 79 MiB for 512 tokens of H-350M's
    mixer); on a GPU the checkpoint's own is kept.

    On the CPU the tokens also go through in segments of CPU_SCAN_SEGMENT, each
    evaluated before the next starts: the scan's float32 intermediates are then
    bounded by one segment, not the whole prefill step (H-350M's mixer, 512
    tokens: 50 MiB in one piece, 17 MiB in segments of 128, same time). Left
    lazy, the segments' graphs are evaluated together and the saving is lost.
    (Prefill only: the compiled decode step never comes here.)

    No prefill kernel is used: a fused scan kernel is only worth keeping where it
    beats this pure-MLX chunked scan, which could not be measured on a GPU here.
    """
    if mx.default_device() != mx.cpu:
        return ssd_chunked_scan(x, dt, A, B, C, D, chunk_size, initial_state)
    chunk_size = min(chunk_size, CPU_SCAN_CHUNK)
    l = x.shape[1]
    if l <= CPU_SCAN_SEGMENT:
        return ssd_chunked_scan(x, dt, A, B, C, D, chunk_size, initial_state)
    ys, state = [], initial_state
    for s in range(0, l, CPU_SCAN_SEGMENT):
        part = slice(s, s + CPU_SCAN_SEGMENT)
        y, state = ssd_chunked_scan(
            x[:, part], dt[:, part], A, B[:, part], C[:, part], D, chunk_size, state
        )
        mx.eval(y, state)
        ys.append(y)
    return mx.concatenate(ys, axis=1), state


CPU_SCAN_CHUNK = 64
CPU_SCAN_SEGMENT = 128


def depthwise_causal_conv(window: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """Causal depthwise conv over time, accumulated in float32.

    window: (b, l + k - 1, ch) the previous k-1 inputs then the new ones;
    weight: (ch, k); bias: (ch,)  ->  (b, l, ch) float32.
    A k-term sum of shifted products: exact, and cheaper than a conv primitive
    for k = 4.
    """
    k = weight.shape[-1]
    l = window.shape[1] - k + 1
    w = weight.astype(mx.float32)
    out = window[:, 0:l].astype(mx.float32) * w[:, 0]
    for i in range(1, k):
        out = out + window[:, i : i + l].astype(mx.float32) * w[:, i]
    if bias is not None:
        out = out + bias.astype(mx.float32)
    return out


def decode_step_reference(
    xBC: mx.array,
    conv_state: mx.array,
    conv_weight: mx.array,
    conv_bias: mx.array | None,
    dt: mx.array,
    dt_bias: mx.array,
    A: mx.array,
    D: mx.array,
    state: mx.array,
    time_step_limit: tuple[float, float],
    n_groups: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """One token through the conv and the SSM, in plain MLX ops.

    xBC: (b, ch) new pre-conv input   conv_state: (b, k-1, ch)   conv_weight: (ch, k)
    dt: (b, h) raw   state: (b, h, p, n) float32
    Returns y (b, h, p) float32, the new conv state (b, k-1, ch), the new state.
    Written as broadcasts over the state's own (b, h, p, n) layout, B and C
    widened from groups to heads first (h * n elements, nothing next to the
    state): measured inside the compiled H-350M step on the CPU, 1.2 ms (7%) less
    time outside the matrix products than a (b, g, h/g, p, n) view of the state.
    Every op here is a dispatch on a GPU.
    """
    b = xBC.shape[0]
    h, p, n = state.shape[1:]
    g = n_groups
    window = mx.concatenate([conv_state, xBC[:, None].astype(conv_state.dtype)], axis=1)  # (b,k,ch)
    # keepdims: (b, 1, ch) reshapes as well as (b, ch) and spares a Squeeze per layer
    conv = (window.astype(mx.float32) * conv_weight.T.astype(mx.float32)).sum(axis=1, keepdims=True)
    if conv_bias is not None:
        conv = conv + conv_bias.astype(mx.float32)
    conv = nn.silu(conv)
    x, B, C = mx.split(conv, [h * p, h * p + g * n], axis=-1)
    dt = discretize_dt(dt, dt_bias, time_step_limit)  # (b,h)
    # exp at (b, h), before the broadcast: fused into the state update, a compiled
    # kernel would take it once per state element (p * n times too many).
    decay = mx.exp(dt * A).reshape(b, h, 1, 1)
    if g == 1:
        B, C = B.reshape(b, 1, 1, n), C.reshape(b, 1, 1, n)
    else:  # head i reads group i // (h / g)
        B, C = (mx.broadcast_to(t.reshape(b, g, 1, n), (b, g, h // g, n)).reshape(b, h, 1, n)
                for t in (B, C))  # fmt: skip
    x = x.reshape(b, h, p, 1)
    s = state * decay + (dt.reshape(b, h, 1, 1) * x) * B  # (b,h,p,n)
    y = (s * C).sum(axis=-1, keepdims=True) + D.astype(mx.float32).reshape(h, 1, 1) * x  # (b,h,p,1)
    return y.reshape(b, h, p), window[:, 1:], s


def decode_step(
    xBC: mx.array,
    conv_state: mx.array,
    conv_weight: mx.array,
    conv_bias: mx.array | None,
    dt: mx.array,
    dt_bias: mx.array,
    A: mx.array,
    D: mx.array,
    state: mx.array,
    time_step_limit: tuple[float, float],
    n_groups: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """The decode dispatch point (arguments as `decode_step_reference`): the fused
    kernel on an Apple (Metal) or NVIDIA (CUDA) GPU, plain MLX ops otherwise or
    when GRANITE_MLX_REFERENCE=1 (see granite_mlx.kernels)."""
    args = (xBC, conv_state, conv_weight, conv_bias, dt, dt_bias, A, D, state)
    out = _fused.fused_ssm_step(*args, time_step_limit, n_groups, oracle=decode_step_reference)
    if out is None:
        out = decode_step_reference(*args, time_step_limit, n_groups)
    return out


def check_decode_kernel(
    n_heads: int,
    head_dim: int,
    d_state: int,
    n_groups: int,
    d_conv: int,
    dtype: mx.Dtype,
    weight_dtype: mx.Dtype,
) -> bool:
    """Run the fused kernel's one-time self-check for this shape and these dtypes
    now (it evaluates arrays, which a compiled graph's trace cannot); whether the
    kernel will be used. False on the CPU or with GRANITE_MLX_REFERENCE=1."""
    return _fused.kernel_self_check(
        n_heads, head_dim, d_state, n_groups, d_conv, dtype, weight_dtype,
        oracle=decode_step_reference,
    )  # fmt: skip
