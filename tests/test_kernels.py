"""The fused Mamba2 decode step: the plain reference (granite_mlx.ssm) vs a numpy
loop, the shared kernel body executed through the C++ emulation vs that
reference on the raw arguments, the fallback and self-check logic, and the
Metal/CUDA sources as MLX would generate them, parsed by g++ against stub
definitions of the GPU builtins.

Shapes: b batch, H heads, P head_dim, N d_state, G groups, K d_conv = 4.
"""

from __future__ import annotations

import ast
import logging
import math
import re
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from granite_mlx import ssm
from granite_mlx.kernels import ssm_step as S
from granite_mlx.kernels.emulate import EmulatedKernel, find_compiler
from granite_mlx.kernels.sources import kernel_source

INF = float("inf")
ARG_NAMES = ("xBC", "conv_state", "conv_w", "conv_b", "dt", "dt_bias", "A", "D", "state")


def make_problem(
    b, H, P, N, G, dtype=mx.float32, dt_limits=(1e-3, INF), seed=0, K=4, weight_dtype=None
):
    """Random fused_ssm_step arguments, with dt values that reach both softplus
    branches and both clamps. Dtypes as the model holds them: activations
    `dtype`, conv weight and bias `weight_dtype` (default `dtype`), A, D and
    dt_bias float32."""
    rng = np.random.default_rng(seed)
    conv_dim = H * P + 2 * G * N
    wt = dtype if weight_dtype is None else weight_dtype

    def arr(shape, scale=1.0, dt=dtype):
        return mx.array((scale * rng.standard_normal(shape)).astype(np.float32)).astype(dt)

    dt = 2.0 * rng.standard_normal((b, H)).astype(np.float32)
    dt[0, 0] = 25.0  # softplus linear branch
    dt[-1, -1] = -30.0  # below any dt_min
    return {
        "xBC": arr((b, conv_dim)),
        "conv_state": arr((b, K - 1, conv_dim)),
        "conv_w": arr((conv_dim, K), 0.5, wt),
        "conv_b": arr((conv_dim,), 0.5, wt),
        "dt": mx.array(dt).astype(dtype),
        "dt_bias": arr((H,), dt=mx.float32),
        "A": -mx.exp(mx.array(rng.uniform(-2.0, 2.0, H).astype(np.float32))),
        "D": arr((H,), dt=mx.float32),
        "state": arr((b, H, P, N), dt=mx.float32),
        "time_step_limit": dt_limits,
        "n_groups": G,
    }


def reference(p):
    """The plain reference step (the oracle) on the raw arguments."""
    args = [p[k] for k in ARG_NAMES]
    return ssm.decode_step_reference(*args, p["time_step_limit"], p["n_groups"])


def fused(p):
    return S.fused_ssm_step(
        *(p[k] for k in ARG_NAMES), p["time_step_limit"], p["n_groups"],
        oracle=ssm.decode_step_reference,
    )  # fmt: skip


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def numpy_step(p):
    """The step as plain loops over batch rows, channels and heads, in float64."""
    xBC, conv_state, conv_w, conv_b, dt, dt_bias, A, D, state = (f64(p[k]) for k in ARG_NAMES)
    b, H, P, N = state.shape
    G, K = p["n_groups"], conv_state.shape[1] + 1
    conv_dim, d_inner = xBC.shape[1], H * P
    conv_w = conv_w.reshape(conv_dim, K)
    y = np.zeros((b, H, P))
    new_state = np.zeros_like(state)
    for i in range(b):
        window = np.concatenate([conv_state[i], xBC[i][None]])  # (K, conv_dim)
        c = np.empty(conv_dim)
        for ch in range(conv_dim):
            acc = conv_b[ch] + sum(window[k, ch] * conv_w[ch, k] for k in range(K))
            c[ch] = acc / (1.0 + math.exp(-acc))
        for h in range(H):
            g = h // (H // G)
            x = c[h * P : (h + 1) * P]
            B = c[d_inner + g * N : d_inner + (g + 1) * N]
            C = c[d_inner + (G + g) * N : d_inner + (G + g + 1) * N]
            v = dt[i, h] + dt_bias[h]
            d = v if v > 20.0 else math.log1p(math.exp(v))
            d = min(max(d, p["time_step_limit"][0]), p["time_step_limit"][1])
            for pp in range(P):
                new_state[i, h, pp] = math.exp(d * A[h]) * state[i, h, pp] + d * x[pp] * B
                y[i, h, pp] = new_state[i, h, pp] @ C + D[h] * x[pp]
    return y, np.concatenate([conv_state[:, 1:], xBC[:, None]], axis=1), new_state


def assert_close(got, want, rtol=1e-5, name=""):
    got = np.array(got.astype(mx.float32)) if isinstance(got, mx.array) else got
    want = np.array(want.astype(mx.float32)) if isinstance(want, mx.array) else want
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=name)


# (b, H, P, N, G, dtype, dt limits): G=2 and 3, P not a multiple of the 16-row
# p-block, N not a multiple of 32 and below 32, fp16/bf16 storage, the
# H-350M shape, N=256 as in granite-4.0-1b.
CASES = {
    "g2-partial-pblock": (2, 4, 20, 40, 2, mx.float32, (1e-3, 0.1)),
    "h350m-shape": (1, 48, 32, 128, 1, mx.float32, (0.0, INF)),
    "g3-small-n-fp16": (2, 6, 8, 16, 3, mx.float16, (1e-3, INF)),
    "n256-bf16": (2, 4, 64, 256, 1, mx.bfloat16, (1e-3, 0.1)),
}


@pytest.mark.parametrize(
    "b,H,P,N,G,dtype,limits",
    [
        CASES["g2-partial-pblock"],
        CASES["g3-small-n-fp16"],
        (2, 4, 8, 16, 1, mx.bfloat16, (0.0, INF)),
    ],
)
def test_reference_matches_numpy_loop(b, H, P, N, G, dtype, limits):
    p = make_problem(b, H, P, N, G, dtype, limits, seed=1)
    want = numpy_step(p)
    got = reference(p)
    assert got[1].dtype == dtype and got[0].dtype == got[2].dtype == mx.float32
    for name, g, w in zip(S.OUTPUT_NAMES, got, want):
        assert_close(g, w, name=name)


def test_kernel_modules_never_import_the_model_side():
    """ssm.py owns the dispatch and the oracle and passes the oracle in: nothing in
    kernels/ imports from outside kernels/ in granite_mlx (no import circle)."""
    for path in Path(S.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                outside = node.level > 1 or (node.module or "").startswith("granite_mlx")
                assert not outside, f"{path.name} imports {'.' * node.level}{node.module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("granite_mlx") for a in node.names), path.name


@pytest.fixture
def fresh_kernel_state(monkeypatch):
    monkeypatch.delenv("GRANITE_MLX_REFERENCE", raising=False)
    monkeypatch.setattr(S, "_state", S._KernelState())


@pytest.fixture
def emulated(fresh_kernel_state, monkeypatch):
    """fused_ssm_step on the "cpu" backend: the shared body run by the emulation."""
    if find_compiler() is None:
        pytest.skip("no C++ compiler (g++/clang++/$CXX) to build the kernel emulation")
    monkeypatch.setattr(S, "_detect_backend", lambda: "cpu")
    monkeypatch.setitem(S._FACTORIES, "cpu", EmulatedKernel)


def test_fused_returns_none_without_gpu(fresh_kernel_state):
    if S._detect_backend() is not None:
        pytest.skip("a GPU backend is present; test_gpu_kernel_matches_reference covers it")
    assert fused(make_problem(1, 4, 8, 16, 2)) is None
    assert not ssm.check_decode_kernel(4, 8, 16, 2, 4, mx.float32, mx.float32)


@pytest.mark.parametrize("case", CASES)
def test_emulated_kernel_matches_reference(emulated, case):
    b, H, P, N, G, dtype, limits = CASES[case]
    p = make_problem(b, H, P, N, G, dtype, limits, seed=2)
    got = fused(p)
    assert got is not None, S._state.disabled
    want = reference(p)
    for name, g, w in zip(S.OUTPUT_NAMES, got, want):
        assert g.dtype == w.dtype, name
        if name == "new_conv_state":
            assert mx.array_equal(g, w).item()  # raw copies; a missed channel stays NaN
        else:
            assert_close(g, w, name=name)


def test_emulated_kernel_keeps_float32_parameters_beside_bf16_weights(emulated):
    """The model holds conv1d in bf16 but dt_bias and D in float32: the kernel must
    read them in float32, as the reference does. (Cast to the conv weight's
    dtype, dt moved by up to 1.4% and y by up to 0.02 here.)"""
    p = make_problem(2, 8, 32, 128, 1, mx.bfloat16, (0.0, INF), seed=3)
    p["dt_bias"] = p["dt_bias"] + 0.0123  # values bf16 cannot hold
    p["D"] = p["D"] + 0.0071
    assert p["conv_w"].dtype == mx.bfloat16 and p["dt_bias"].dtype == p["D"].dtype == mx.float32
    got = fused(p)
    assert got is not None, S._state.disabled
    for name, g, w in zip(S.OUTPUT_NAMES, got, reference(p)):
        assert_close(g, w, rtol=1e-5, name=name)


@pytest.mark.parametrize("layout", [(1, 4), (4, 1)])
def test_kernel_accepts_checkpoint_conv_layouts(emulated, layout):
    """Hub conv1d weights are (conv_dim, 1, K), mlx-community ones (conv_dim, K, 1)."""
    p = make_problem(1, 4, 8, 16, 2)
    want = reference(p)
    p["conv_w"] = p["conv_w"].reshape(p["conv_w"].shape[0], *layout)
    for name, g, w in zip(S.OUTPUT_NAMES, fused(p), want):
        assert_close(g, w, name=name)


def test_kernel_rejects_mismatched_shapes(emulated):
    p = make_problem(1, 4, 8, 16, 2)
    p["dt"] = p["dt"][:, :3]
    with pytest.raises(ValueError, match="dt has shape"):
        fused(p)


def test_self_check_oracle_sees_the_raw_arguments(emulated, monkeypatch, caplog):
    """A lossy cast in the launch code (dt_bias and D to the conv weight's bf16, as
    _prepare once did) is a mismatch: the oracle runs on the arguments as given."""
    prepare = S._prepare

    def lossy(xBC, conv_state, conv_w, conv_b, dt, dt_bias, A, D, state, n_groups):
        args, dims = prepare(xBC, conv_state, conv_w, conv_b, dt, dt_bias, A, D, state, n_groups)
        args = list(args)
        args[5], args[7] = (a.astype(conv_w.dtype) for a in (args[5], args[7]))
        return tuple(args), dims

    monkeypatch.setattr(S, "_prepare", lossy)
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        assert not ssm.check_decode_kernel(8, 32, 128, 1, 4, mx.bfloat16, mx.bfloat16)
    assert "differs from the reference" in S._state.disabled


def test_conv_state_written_exactly_once(emulated):
    """Turn every new_conv_state store into "+= 1" and count, over a grid where
    B/C channels are shared by several heads and p-blocks."""
    header, source = kernel_source(S.BODY_FILE, "cpu")
    counting, stores = re.subn(
        r"new_conv_state\[([^\]]+)\] = [^;]+;", r"new_conv_state[\1] += 1.0f;", source
    )
    assert stores == 2
    p = make_problem(2, 6, 20, 40, 3)
    args, dims = S._prepare(*(p[k] for k in ARG_NAMES), p["n_groups"])
    template, grid, threadgroup = S.launch_plan(dims, mx.float32, mx.float32)
    kernel = EmulatedKernel("count_stores", S.INPUT_NAMES, S.OUTPUT_NAMES, counting, header)
    _, counts, _ = kernel(
        inputs=[*args, mx.array([0.0, INF])],
        template=template,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[(2, 6, 20), (2, 3, dims.conv_dim), (2, 6, 20, 40)],
        output_dtypes=[mx.float32] * 3,
        init_value=0.0,
    )
    assert grid[0] // threadgroup[0] == 2  # two p-blocks per head
    np.testing.assert_array_equal(np.array(counts), 1.0)


def test_env_var_forces_reference(emulated, monkeypatch):
    monkeypatch.setenv("GRANITE_MLX_REFERENCE", "1")
    assert fused(make_problem(1, 4, 8, 16, 2)) is None


# Bugs the emulation must not let through: each edit breaks the real body.
BROKEN_BODIES = {
    "missing barrier": (("GK_BARRIER();", ""), "differs from the reference"),
    "simd sum in divergent code": (
        (
            "const float total = GK_SIMD_SUM(part);",
            "const float total = lane < 16 ? GK_SIMD_SUM(part) : 0.0f;",
        ),
        "deadlock",
    ),
    "B/C conv state never written": (("owner = owns_bc;", "owner = false;"), "new_conv_state"),
}


@pytest.mark.parametrize("bug", BROKEN_BODIES)
def test_emulation_catches_broken_body(emulated, monkeypatch, bug):
    (old, new), symptom = BROKEN_BODIES[bug]

    def broken(source, **kw):
        assert old in source
        return EmulatedKernel(source=source.replace(old, new), **kw)

    monkeypatch.setitem(S._FACTORIES, "cpu", broken)
    assert fused(make_problem(1, 4, 8, 16, 2)) is None
    assert symptom in S._state.disabled


class FakeKernel:
    """Stands in for mx.fast.*_kernel: wrong numbers, or a compile error."""

    calls = 0

    def __init__(self, mode, **_):
        self.mode = mode

    def __call__(self, *, output_shapes, output_dtypes, **_):
        FakeKernel.calls += 1
        if self.mode == "compile_error":
            raise RuntimeError("Unable to build metal library from source")
        return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]


@pytest.mark.parametrize("mode", ["wrong_output", "compile_error"])
def test_self_check_disables_broken_kernel(fresh_kernel_state, monkeypatch, caplog, mode):
    monkeypatch.setattr(S, "_detect_backend", lambda: "metal")
    monkeypatch.setitem(S._FACTORIES, "metal", lambda **kw: FakeKernel(mode, **kw))
    monkeypatch.setattr(FakeKernel, "calls", 0)
    p = make_problem(1, 4, 8, 16, 2)
    with caplog.at_level(logging.WARNING, logger=S.__name__):
        assert fused(p) is None
        assert fused(p) is None
        assert not ssm.check_decode_kernel(48, 32, 128, 1, 4, mx.float32, mx.float32)
    warnings = [r for r in caplog.records if r.name == S.__name__]
    assert len(warnings) == 1 and "disabled" in warnings[0].getMessage()
    assert FakeKernel.calls == 1  # the self-check only; never launched for real


# --- Metal and CUDA: the sources MLX 0.32 would generate, parsed by g++ ------

# Enough of each GPU dialect for g++ to type-check prelude + entry + body.
METAL_STUBS = r"""
#include <cmath>
#include <cstddef>
#define device
#define constant
#define threadgroup
typedef unsigned int uint;
struct uint3 { uint x, y, z; };
typedef _Float16 half;
typedef half float16_t;
struct bfloat16_t { unsigned short bits; explicit operator float() const { return 0.0f; } };
namespace metal {
namespace precise {
inline float exp(float v) { return std::exp(v); }
inline float log(float v) { return std::log(v); }
}  // namespace precise
inline float fmin(float a, float b) { return std::fmin(a, b); }
inline float fmax(float a, float b) { return std::fmax(a, b); }
enum class mem_flags { mem_none, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
inline float simd_sum(float v) { return v; }
}  // namespace metal
#define std no_std_in_gpu_code
"""

CUDA_STUBS = r"""
#include <cmath>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define inf (1.0f / 0.0f)  // MLX's default header defines this macro too
struct __half { unsigned short bits; };
struct __nv_bfloat16 { unsigned short bits; };
inline float __half2float(__half) { return 0.0f; }
inline float __bfloat162float(__nv_bfloat16) { return 0.0f; }
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
inline void __syncthreads() {}
struct gk_dim3 { unsigned x, y, z; };
inline gk_dim3 threadIdx, blockIdx;
namespace cooperative_groups {}
#define std no_std_in_gpu_code
"""

# mx.fast.metal_kernel declares these, in this order, when the body names them.
METAL_ATTRIBUTES = [
    ("simdgroup_index_in_threadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threads_per_threadgroup", "uint3"),
]
METAL_TYPES = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t"}
CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16"}


def launch_inputs(dtype):
    p = make_problem(1, 4, 20, 40, 2, dtype)  # A, D, ... have 4 < 8 elements: Metal `constant`
    args, dims = S._prepare(*(p[k] for k in ARG_NAMES), p["n_groups"])
    template, _, _ = S.launch_plan(dims, args[0].dtype, args[2].dtype)
    return [*args, mx.array([0.0, 1.0])], template


def metal_source(dtype, name):
    """What MLX's metal_kernel writes after the header: template kernel, instantiation."""
    source = kernel_source(S.BODY_FILE, "metal")[1]
    inputs, template = launch_inputs(dtype)
    n_in = len(inputs)
    params = [
        f"const {'constant' if a.size < 8 else 'device'} {METAL_TYPES[a.dtype]}* {n} "
        f"[[buffer({i})]]"
        for i, (n, a) in enumerate(zip(S.INPUT_NAMES, inputs))
    ]
    params += [
        f"device {METAL_TYPES[d]}* {n} [[buffer({n_in + i})]]"
        for i, (n, d) in enumerate(zip(S.OUTPUT_NAMES, [mx.float32, dtype, mx.float32]))
    ]
    params += [f"{t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES if a in source]
    tparams = ", ".join(
        f"{'typename' if isinstance(v, mx.Dtype) else 'int'} {k}" for k, v in template
    )
    targs = ", ".join(METAL_TYPES[v] if isinstance(v, mx.Dtype) else str(v) for _, v in template)
    signature = ",\n  ".join(params)
    return (
        f"template <{tparams}>\n[[kernel]] void {name}(\n  {signature}) {{\n{source}\n}}\n"
        f'template [[host_name("{name}")]] [[kernel]] '
        f"decltype({name}<{targs}>) {name}<{targs}>;\n"
    )


def cuda_source(dtype, name):
    """What MLX's cuda_kernel writes after the headers."""
    source = kernel_source(S.BODY_FILE, "cuda")[1]
    inputs, template = launch_inputs(dtype)
    params = [f"const {CUDA_TYPES[a.dtype]}* {n}" for n, a in zip(S.INPUT_NAMES, inputs)]
    params += [
        f"{CUDA_TYPES[d]}* {n}" for n, d in zip(S.OUTPUT_NAMES, [mx.float32, dtype, mx.float32])
    ]
    consts = "\n".join(
        f"  using {k} = {CUDA_TYPES[v]};"
        if isinstance(v, mx.Dtype)
        else f"  constexpr int {k} = {v};"
        for k, v in template
    )
    signature = ",\n    ".join(params)
    return (
        "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
        f"__global__ void {name}(\n    {signature}) {{\n{consts}\n{source}\n}}\n"
        "}  // namespace mlx::core::cu\n"
    )


@pytest.mark.parametrize("backend", ["metal", "cuda"])
def test_gpu_sources_parse_with_stubs(backend, tmp_path):
    """Catches typos and undefined names in prelude.metal / prelude.cu and the
    body as those backends see it; real Metal/CUDA compilation needs the GPU."""
    compiler = find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler (g++/clang++/$CXX)")
    stubs, make = (METAL_STUBS, metal_source) if backend == "metal" else (CUDA_STUBS, cuda_source)
    kernels = [make(dt, f"k_{i}") for i, dt in enumerate(METAL_TYPES)]
    src = tmp_path / "kernel.cpp"
    src.write_text(stubs + kernel_source(S.BODY_FILE, backend)[0] + "".join(kernels))
    done = subprocess.run(
        [compiler, "-std=c++17", "-fsyntax-only", "-Wno-attributes", str(src)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def test_gpu_kernel_matches_reference(fresh_kernel_state):
    """On a Mac or CUDA machine: the real kernel, at the H-350M shape, against the
    plain reference on the raw arguments (bf16 weights beside float32 A, D, dt_bias)."""
    if S._detect_backend() is None:
        pytest.skip("no Metal or CUDA backend on this machine")
    for dtype in (mx.float32, mx.bfloat16):
        p = make_problem(2, 48, 32, 128, 1, dtype, (0.0, INF), seed=3)
        got = fused(p)
        assert got is not None, S._state.disabled
        for name, g, w in zip(S.OUTPUT_NAMES, got, reference(p)):
            assert_close(g, w, rtol=1e-4, name=name)
