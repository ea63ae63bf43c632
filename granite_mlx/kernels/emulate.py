"""Run a shared kernel body on the CPU, behind the ``mx.fast.*_kernel`` interface.

``EmulatedKernel`` takes the constructor and call arguments of
``mx.fast.cuda_kernel`` and produces what the GPU would, by compiling the body
with the C++ prelude (``prelude_cpu.h``) and running it as a subprocess: every
threadgroup, every thread (a fiber), every barrier and simd reduction. It
writes the kernel function the way MLX's CUDA backend generates it (typed
input pointers, output pointers, template arguments as ``constexpr`` /
``using`` lines), so a mistake in the Python launch code (input order, dtypes,
template arguments, grid) shows up here too.

For tests: it needs a C++20 compiler (``$CXX``, else ``g++``/``clang++``), and
one compile (about a second) per distinct set of template arguments.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from .sources import kernel_source

# MLX dtype -> (C++ type in the emulation, numpy dtype holding its bits)
_TYPES = {
    mx.float32: ("float", np.float32),
    mx.float16: ("_Float16", np.float16),
    mx.bfloat16: ("gk_bf16", np.uint16),
    mx.int32: ("int32_t", np.int32),
    mx.uint32: ("uint32_t", np.uint32),
}


def find_compiler() -> str | None:
    """A C++ compiler on PATH, or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and (path := shutil.which(name)):
            return path
    return None


_build_dir: Path | None = None
_binaries: dict[str, Path] = {}


def _build(cxx_source: str) -> Path:
    """Compile once per distinct source in this process."""
    global _build_dir
    digest = hashlib.sha1(cxx_source.encode()).hexdigest()[:16]
    if digest in _binaries:
        return _binaries[digest]
    compiler = find_compiler()
    if compiler is None:
        raise RuntimeError("kernel emulation needs a C++20 compiler (set CXX)")
    if _build_dir is None:
        _build_dir = Path(tempfile.mkdtemp(prefix="gk-emu-"))
        atexit.register(shutil.rmtree, _build_dir, True)
    src = _build_dir / f"{digest}.cpp"
    exe = _build_dir / digest
    src.write_text(cxx_source)
    cmd = [compiler, "-std=c++20", "-O1", "-Wall", "-o", str(exe), str(src)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"emulated kernel failed to compile:\n{done.stderr}")
    _binaries[digest] = exe
    return exe


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype not in _TYPES:
        raise TypeError(f"emulation has no C++ type for {a.dtype}")
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


class EmulatedKernel:
    """CPU stand-in for ``mx.fast.cuda_kernel(name, input_names, output_names, source, header)``.

    ``source`` and ``header`` must come from ``kernel_source(body, "cpu")``.
    """

    def __init__(
        self,
        name: str,
        input_names: list[str],
        output_names: list[str],
        source: str,
        header: str = "",
        timeout: float = 120.0,
        **_: object,
    ) -> None:
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.timeout = timeout

    @classmethod
    def from_body(cls, body_file: str, name: str, input_names, output_names) -> EmulatedKernel:
        header, source = kernel_source(body_file, "cpu")
        return cls(name, input_names, output_names, source, header)

    def cxx_source(self, inputs, template, output_dtypes) -> str:
        """The whole program: prelude, kernel function, main()."""
        params = [f"const {_TYPES[a.dtype][0]}* {n}" for n, a in zip(self.input_names, inputs)] + [
            f"{_TYPES[d][0]}* {n}" for n, d in zip(self.output_names, output_dtypes)
        ]
        consts = []
        for tname, value in template:
            if isinstance(value, bool):
                consts.append(f"  constexpr bool {tname} = {'true' if value else 'false'};")
            elif isinstance(value, int):
                consts.append(f"  constexpr int {tname} = {value};")
            else:
                consts.append(f"  using {tname} = {_TYPES[value][0]};")
        n_in, n_out = len(inputs), len(output_dtypes)
        # Outputs start from files too, NaN or init_value, as __call__ writes them.
        buffers = [f'auto in{i} = gk_emu::read_buffer(argv[1], "in", {i});' for i in range(n_in)]
        buffers += [
            f'auto out{i} = gk_emu::read_buffer(argv[1], "out", {i});' for i in range(n_out)
        ]
        call_args = [
            f"reinterpret_cast<const {_TYPES[a.dtype][0]}*>(in{i}.data)"
            for i, a in enumerate(inputs)
        ]
        call_args += [
            f"reinterpret_cast<{_TYPES[d][0]}*>(out{i}.data)" for i, d in enumerate(output_dtypes)
        ]
        writes = [f"gk_emu::write_buffer(argv[1], {i}, out{i});" for i in range(n_out)]
        return "\n".join(
            [
                self.header,
                f"void {self.name}(",
                "    " + ",\n    ".join(params) + ") {",
                *consts,
                self.source,
                "}",
                "",
                "int main(int argc, char** argv) {",
                '  if (argc != 8) gk_emu::fail("bad arguments");',
                "  const int grid[3] = {std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4])};",
                "  const int tg[3] = {std::atoi(argv[5]), std::atoi(argv[6]), std::atoi(argv[7])};",
                *("  " + s for s in buffers),
                f"  gk_emu::launch(grid, tg, [&] {{ {self.name}({', '.join(call_args)}); }});",
                *("  " + s for s in writes),
                "  return 0;",
                "}",
                "",
            ]
        )

    def __call__(
        self,
        *,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template=(),
        init_value=None,
        verbose=False,
        stream=None,
    ) -> list[mx.array]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs, got {len(inputs)}")
        source = self.cxx_source(inputs, template, output_dtypes)
        if verbose:
            print(source)
        exe = _build(source)
        with tempfile.TemporaryDirectory(prefix="gk-run-") as run_dir:
            for i, a in enumerate(inputs):
                _to_numpy(a).tofile(os.path.join(run_dir, f"in{i}.bin"))
            for i, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes)):
                start = mx.full(shape, math.nan if init_value is None else init_value, dtype)
                _to_numpy(start).tofile(os.path.join(run_dir, f"out{i}.bin"))
            args = [str(exe), run_dir, *map(str, grid), *map(str, threadgroup)]
            try:
                done = subprocess.run(
                    args, check=False, capture_output=True, text=True, timeout=self.timeout
                )
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"emulated kernel {self.name} timed out") from e
            if done.returncode != 0:
                raise RuntimeError(f"emulated kernel {self.name} failed: {done.stderr.strip()}")
            outs = []
            for i, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes)):
                data = np.fromfile(os.path.join(run_dir, f"out{i}.bin"), dtype=_TYPES[dtype][1])
                out = mx.array(data.reshape(shape))
                outs.append(out.view(mx.bfloat16) if dtype == mx.bfloat16 else out)
        return outs
