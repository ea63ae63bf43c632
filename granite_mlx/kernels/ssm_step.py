"""Fused single-token Mamba2 decode step: conv, SiLU, dt, state update and y.

Glossary: b batch rows, H n_heads, P head_dim, N d_state, G n_groups (head h
reads group h // (H / G)), K d_conv, conv_dim = H * P + 2 * G * N.

One step per batch row (GRANITE.md, "The Mamba2 mixer", steps 2-5), in float32:

1. window = [conv_state; xBC]                      (K, conv_dim); new_conv_state = window[1:]
2. c = silu(sum_k window[k] * conv_w[:, k] + conv_b), split into x (H, P), B (G, N), C (G, N)
3. dt = clamp(softplus(dt + dt_bias), dt_min, dt_max)                    (H,)
4. S = exp(dt * A) * S + dt * outer(x, B[g])                              (H, P, N)
5. y = S @ C[g] + D * x                                                   (H, P)

``fused_ssm_step`` runs all of it as one GPU launch per layer per token, Metal
or CUDA, from a single kernel body (``ssm_step_body.h``) that the C++ emulation
in the tests also executes. It returns None where no kernel can run (CPU, or
the kernel was disabled), and the caller uses its own pure-MLX step.

This module never imports the model side: ``granite_mlx.ssm`` owns the dispatch
and hands in the *oracle*, its plain reference step
(``ssm.decode_step_reference``), with the same arguments. Before the kernel's
first launch for a given shape and dtype in a process, ``kernel_self_check``
runs kernel and oracle on the same raw random inputs (the dtypes the model
holds: bf16/fp16/fp32 weights, float32 ``A``, ``D`` and ``dt_bias``); a compile
error or a mismatch logs one warning and disables the kernel for the rest of
the process. The oracle sees the arguments as given, not as the kernel's
launch code prepared them, so a lossy cast there is a mismatch too.

Environment:
    GRANITE_MLX_REFERENCE=1  always take the reference path (``fused_ssm_step``
                             returns None).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .sources import kernel_source

logger = logging.getLogger(__name__)

BODY_FILE = "ssm_step_body.h"
INPUT_NAMES = (
    "xBC",
    "conv_state",
    "conv_w",
    "conv_b",
    "dt",
    "dt_bias",
    "A",
    "D",
    "state",
    "dt_limits",
)
OUTPUT_NAMES = ("y", "new_conv_state", "new_state")

_N_SIMD = 4  # simdgroups per threadgroup: 128 threads
_MAX_ROWS = 4  # head_dim rows per simdgroup, so up to 16 rows per threadgroup
_SIMD_WIDTH = 32  # Apple GPUs and NVIDIA warps alike
_F32_MAX = 3.4028234663852886e38
_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)

# Backend name -> mx.fast kernel constructor. Looked up at call time, so an MLX
# without one of them only fails on the machine that would use it.
_FACTORIES: dict[str, Callable[..., object]] = {
    "metal": lambda **kw: mx.fast.metal_kernel(**kw),
    "cuda": lambda **kw: mx.fast.cuda_kernel(**kw),
}

Arrays = tuple[mx.array, mx.array, mx.array]


@dataclass(frozen=True)
class SSMDims:
    batch: int
    n_heads: int  # H
    head_dim: int  # P
    d_state: int  # N
    n_groups: int  # G
    d_conv: int  # K

    @property
    def conv_dim(self) -> int:
        return self.n_heads * self.head_dim + 2 * self.n_groups * self.d_state


def _prepare(xBC, conv_state, conv_w, conv_b, dt, dt_bias, A, D, state, n_groups):
    """Check shapes and settle the dtypes the kernel reads.

    Activations (conv_state, dt) take xBC's dtype; conv_w keeps its own (the
    bulk of the weight bytes); the small per-channel and per-head parameters
    (conv_b, dt_bias, A, D) and the state become float32: a cast up is exact,
    while casting dt_bias and D down to a bf16 conv weight's dtype moved dt by
    up to 1.4% on the H-350M shape. Fixed dtypes also matter on Metal, where MLX
    caches a kernel by its template arguments, not by its input dtypes.
    conv_w may come as (conv_dim, K), (conv_dim, 1, K) (Hub) or (conv_dim, K, 1)
    (mlx-community); conv_b may be None (no conv bias).
    """
    batch, n_heads, head_dim, d_state = state.shape
    dims = SSMDims(batch, n_heads, head_dim, d_state, n_groups, conv_state.shape[1] + 1)
    if conv_b is None:
        conv_b = mx.zeros((dims.conv_dim,), mx.float32)
    expected = {
        "xBC": (xBC, (batch, dims.conv_dim)),
        "conv_state": (conv_state, (batch, dims.d_conv - 1, dims.conv_dim)),
        "conv_b": (conv_b, (dims.conv_dim,)),
        "dt": (dt, (batch, n_heads)),
        "dt_bias": (dt_bias, (n_heads,)),
        "A": (A, (n_heads,)),
        "D": (D, (n_heads,)),
    }
    for name, (arr, shape) in expected.items():
        if tuple(arr.shape) != shape:
            raise ValueError(f"ssm step: {name} has shape {tuple(arr.shape)}, expected {shape}")
    if conv_w.size != dims.conv_dim * dims.d_conv:
        raise ValueError(
            f"ssm step: conv_w has shape {tuple(conv_w.shape)}, "
            f"expected ({dims.conv_dim}, {dims.d_conv})"
        )
    if n_groups < 1 or n_heads % n_groups:
        raise ValueError(f"ssm step: n_heads {n_heads} is not a multiple of n_groups {n_groups}")
    if dims.d_conv < 2:
        raise ValueError("ssm step: conv_state must keep at least one past input")

    act, f32 = xBC.dtype, mx.float32
    args = (
        xBC,
        conv_state.astype(act),
        conv_w.reshape(dims.conv_dim, dims.d_conv),
        conv_b.astype(f32),
        dt.astype(act),
        dt_bias.astype(f32),
        A.astype(f32),
        D.astype(f32),
        state.astype(f32),
    )
    return args, dims


Oracle = Callable[..., Arrays]
"""The plain reference step: ``oracle(xBC, conv_state, conv_w, conv_b, dt, dt_bias,
A, D, state, (dt_min, dt_max), n_groups) -> (y, new_conv_state, new_state)``,
the arguments (and results) of ``fused_ssm_step``."""


def launch_plan(dims: SSMDims, act_dtype: mx.Dtype, weight_dtype: mx.Dtype):
    """``(template, grid, threadgroup)`` for the kernel, grid counted in threads.

    One threadgroup per (p-block, head, batch row); _N_SIMD simdgroups of 32
    threads, each taking up to _MAX_ROWS rows of head_dim.
    """
    # T and WT go unused by the body (gk_f overloads read any dtype), but MLX
    # names and caches a Metal kernel by its template arguments, not by its
    # input dtypes, so they must be there.
    rows = min(_MAX_ROWS, -(-dims.head_dim // _N_SIMD))
    p_blocks = -(-dims.head_dim // (_N_SIMD * rows))
    threads = _N_SIMD * _SIMD_WIDTH
    template = [
        ("T", act_dtype),
        ("WT", weight_dtype),
        ("NHEADS", dims.n_heads),
        ("HEADDIM", dims.head_dim),
        ("DSTATE", dims.d_state),
        ("NGROUPS", dims.n_groups),
        ("DCONV", dims.d_conv),
        ("NSIMD", _N_SIMD),
        ("ROWS", rows),
    ]
    return template, (p_blocks * threads, dims.n_heads, dims.batch), (threads, 1, 1)


class _KernelState:
    def __init__(self) -> None:
        self.kernels: dict[str, object] = {}  # backend -> mx.fast kernel
        self.checked: set[tuple] = set()  # (backend, dims..., dtypes) that passed
        self.disabled: str | None = None  # why, once disabled


_state = _KernelState()
_lock = threading.Lock()


def _reference_forced() -> bool:
    return os.environ.get("GRANITE_MLX_REFERENCE", "") not in ("", "0")


def _detect_backend() -> str | None:
    if mx.default_device().type != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def _kernel(backend: str):
    kernel = _state.kernels.get(backend)
    if kernel is None:
        header, source = kernel_source(BODY_FILE, backend)
        kernel = _FACTORIES[backend](
            name="granite_ssm_step",
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            source=source,
            header=header,
        )
        _state.kernels[backend] = kernel
    return kernel


def _launch(backend: str, args, dims: SSMDims, dt_min: float, dt_max: float) -> Arrays:
    act, wt = args[0].dtype, args[2].dtype
    template, grid, threadgroup = launch_plan(dims, act, wt)
    # Finite limits: an inf in a kernel compiled with fast math is not safe.
    limits = mx.array([max(dt_min, -_F32_MAX), min(dt_max, _F32_MAX)], dtype=mx.float32)
    y, new_conv_state, new_state = _kernel(backend)(
        inputs=[*args, limits],
        template=template,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[
            (dims.batch, dims.n_heads, dims.head_dim),
            (dims.batch, dims.d_conv - 1, dims.conv_dim),
            (dims.batch, dims.n_heads, dims.head_dim, dims.d_state),
        ],
        output_dtypes=[mx.float32, act, mx.float32],
    )
    return y, new_conv_state, new_state


def _random_problem(dims: SSMDims, act: mx.Dtype, wt: mx.Dtype, seed: int = 0) -> tuple:
    """Raw arguments for fused_ssm_step and the oracle (dt limits (1e-3, inf)), in the
    dtypes the model holds: activations `act`, conv weight and bias `wt`, and
    A, D, dt_bias in float32 (granite_mlx.weights.FLOAT32_PARAMS)."""
    keys = mx.random.split(mx.random.key(seed), 9)
    H, cd, K = dims.n_heads, dims.conv_dim, dims.d_conv

    def normal(i, shape, dtype, scale=1.0):
        return (scale * mx.random.normal(shape, key=keys[i])).astype(dtype)

    return (
        normal(0, (dims.batch, cd), act),
        normal(1, (dims.batch, K - 1, cd), act),
        normal(2, (cd, K), wt, 0.5),
        normal(3, (cd,), wt, 0.5),
        normal(4, (dims.batch, H), act, 2.0),
        normal(5, (H,), mx.float32),
        -mx.exp(mx.random.uniform(-2.0, 2.0, (H,), key=keys[6])),
        normal(7, (H,), mx.float32),
        normal(8, (dims.batch, H, dims.head_dim, dims.d_state), mx.float32),
        (1e-3, float("inf")),
        dims.n_groups,
    )


def _mismatch(
    backend: str, dims: SSMDims, act: mx.Dtype, wt: mx.Dtype, oracle: Oracle
) -> str | None:
    """Run kernel and oracle on one random problem; describe any disagreement."""
    problem = _random_problem(dims, act, wt)
    args, _ = _prepare(*problem[:9], dims.n_groups)
    got = _launch(backend, args, dims, *problem[9])
    want = oracle(*problem)
    mx.eval(got, want)
    for name, g, w in zip(OUTPUT_NAMES, got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"{name} is {g.dtype}{tuple(g.shape)}, expected {w.dtype}{tuple(w.shape)}"
        ok = (
            mx.array_equal(g, w)
            if name == "new_conv_state"
            else mx.allclose(g, w, rtol=1e-4, atol=1e-4)
        )
        if not ok.item():
            err = mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max().item()
            return f"{name} differs from the reference (max abs error {err:.3g})"
    return None


def kernel_self_check(
    n_heads: int,
    head_dim: int,
    d_state: int,
    n_groups: int,
    d_conv: int = 4,
    dtype: mx.Dtype = mx.float32,
    weight_dtype: mx.Dtype | None = None,
    *,
    oracle: Oracle,
) -> bool:
    """Whether the fused kernel may run for this shape and these dtypes.

    The first time a (backend, shape, dtypes) is asked for in a process, the
    kernel runs once on random raw inputs (batch 2) against `oracle`. A compile
    error or mismatch logs one warning and disables the kernel for the rest of
    the process. False as well where no kernel backend exists.
    """
    if _reference_forced():
        return False
    backend = _detect_backend()
    if backend is None:
        return False
    wt = dtype if weight_dtype is None else weight_dtype
    dims = SSMDims(2, n_heads, head_dim, d_state, n_groups, d_conv)
    key = (backend, n_heads, head_dim, d_state, n_groups, d_conv, dtype, wt)
    with _lock:
        if _state.disabled is not None:
            return False
        if key in _state.checked:
            return True
        try:
            problem = _mismatch(backend, dims, dtype, wt, oracle)
        except Exception as e:  # noqa: BLE001 - a compile error surfaces here, at eval
            problem = f"{type(e).__name__}: {e}"
        if problem is not None:
            _state.disabled = problem
            shape = f"H={n_heads} P={head_dim} N={d_state} G={n_groups} K={d_conv}, {dtype}/{wt}"
            logger.warning(
                "fused Mamba2 step kernel (%s) disabled, using the MLX reference instead: %s (%s)",
                backend,
                problem,
                shape,
            )
            return False
        _state.checked.add(key)
        return True


def fused_ssm_step(
    xBC: mx.array,
    conv_state: mx.array,
    conv_w: mx.array,
    conv_b: mx.array | None,
    dt: mx.array,
    dt_bias: mx.array,
    A: mx.array,
    D: mx.array,
    state: mx.array,
    time_step_limit: tuple[float, float],
    n_groups: int,
    *,
    oracle: Oracle,
) -> Arrays | None:
    """One decode step as one GPU kernel launch, or None to use the reference.

    Args (b batch rows):
        xBC: (b, conv_dim) new pre-conv input.
        conv_state: (b, K-1, conv_dim) previous K-1 pre-conv inputs, oldest first.
        conv_w: (conv_dim, K), or (conv_dim, 1, K) / (conv_dim, K, 1).
        conv_b: (conv_dim,) or None.
        dt: (b, H) raw, before dt_bias and softplus.
        dt_bias, A (= -exp(A_log)), D: (H,)
        state: (b, H, P, N) float32.
        time_step_limit: (dt_min, dt_max), the clamp of softplus(dt + dt_bias).
        n_groups: G.
        oracle: the plain reference step with these same arguments, for the
            one-time self-check.

    Returns y (b, H, P) float32, new_conv_state (b, K-1, conv_dim) in xBC's
    dtype, new_state (b, H, P, N) float32; or None when GRANITE_MLX_REFERENCE is
    set, on CPU, for dtypes other than float32, float16 and bfloat16, or once
    the kernel has been disabled.
    """
    if _reference_forced() or _state.disabled is not None:
        return None
    backend = _detect_backend()
    if backend is None:
        return None
    args, dims = _prepare(xBC, conv_state, conv_w, conv_b, dt, dt_bias, A, D, state, n_groups)
    act, wt = args[0].dtype, args[2].dtype
    if act not in _FLOAT_DTYPES or wt not in _FLOAT_DTYPES:
        return None
    if not kernel_self_check(
        dims.n_heads, dims.head_dim, dims.d_state, dims.n_groups, dims.d_conv, act, wt,
        oracle=oracle,
    ):  # fmt: skip
        return None
    return _launch(backend, args, dims, *time_step_limit)
