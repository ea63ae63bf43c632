"""Check a safetensors file's header against its size before handing it to MLX.

A truncated download or a damaged file must give a clear error, never a crash
or a hang inside a native loader.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .errors import CheckpointError

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024


def check_safetensors(path: Path) -> dict:
    """Validate `path`; return its parsed header (tensor name -> info)."""
    fix = "Download or convert the checkpoint again."
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes): no safetensors header. {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path} is truncated or not a safetensors file (header claims {n} bytes, "
                    f"file has {size}). {fix}"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"Cannot read {path}: {e.strerror or e}.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e}). {fix}") from None
    data = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            need = math.prod(shape) * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a corrupt header entry. {fix}") from None
        if stop - start != need or start < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({dtype} {shape}) does not match its byte range. {fix}"
            )
        end = max(end, stop)
    if end > data:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {end} bytes of data but only {data} are there. "
            f"{fix}"
        )
    return header
