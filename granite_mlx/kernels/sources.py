"""Assemble a shared kernel body with one backend's prelude.

A kernel body (``*_body.h``) is written once against a few macros and helpers
(``gk_tid``, ``gk_group_x/y/z``, ``GK_SIMD``, ``GK_SHARED``, ``GK_BARRIER``,
``GK_SIMD_SUM``, ``gk_f``, ``gk_exp``, ...). Each backend's prelude defines them:

- ``metal``: ``prelude.metal``, for ``mx.fast.metal_kernel``;
- ``cuda``: ``prelude.cu``, for ``mx.fast.cuda_kernel``;
- ``cpu``: ``prelude_cpu.h``, the C++ emulation in :mod:`granite_mlx.kernels.emulate`.

A prelude is a header plus a few *entry* lines between ``// gk-entry-begin``
and ``// gk-entry-end`` that open the kernel body (they read the backend's
thread indices, which Metal only declares when the body itself names them).
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

PRELUDES = {"metal": "prelude.metal", "cuda": "prelude.cu", "cpu": "prelude_cpu.h"}

_BEGIN = "// gk-entry-begin"
_END = "// gk-entry-end"


@cache
def read_text(filename: str) -> str:
    """A file shipped in this package (package data, so it works from a wheel)."""
    return files(__package__).joinpath(filename).read_text(encoding="utf-8")


def kernel_source(body_file: str, backend: str) -> tuple[str, str]:
    """``(header, source)`` for ``mx.fast.<backend>_kernel`` (or the emulator).

    The header is the prelude without its entry lines; the source is the entry
    lines followed by the body.
    """
    prelude = read_text(PRELUDES[backend])
    head, sep, rest = prelude.partition(_BEGIN)
    entry, sep2, tail = rest.partition(_END)
    if not sep or not sep2:
        raise RuntimeError(f"{PRELUDES[backend]} lacks its gk-entry markers")
    return head + tail, entry.strip() + "\n" + read_text(body_file)
