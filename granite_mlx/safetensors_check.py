"""Check a safetensors file's header against its size before handing it to MLX.

A truncated download or a damaged file must give a clear error, never a crash
or a hang inside a native loader: every header entry's types are checked
(integer sizes and byte offsets, a known dtype), every tensor's byte range must
fit its shape, lie inside the file and overlap no other tensor's.
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
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entry = _entry(path, name, info, fix)
        ranges.append((entry[0], entry[1], name))
    ranges.sort()
    for (_, stop, first), (start, _, second) in zip(ranges, ranges[1:]):
        if start < stop:
            raise CheckpointError(
                f"{path}: tensors {first!r} and {second!r} overlap in the file (corrupt header). "
                f"{fix}"
            )
    end = max((stop for _, stop, _ in ranges), default=0)
    if end > data:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {end} bytes of data but only {data} are there. "
            f"{fix}"
        )
    return header


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, info, fix: str) -> tuple[int, int]:
    """A tensor's (start, stop) byte range, after checking its header entry's types."""
    try:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError):
        msg = f"{path}: tensor {name!r} has a corrupt header entry. {fix}"
        raise CheckpointError(msg) from None
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise CheckpointError(f"{path}: tensor {name!r} has an unknown dtype {dtype!r}. {fix}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(
            f"{path}: tensor {name!r} has a corrupt shape {shape!r} (not a list of sizes). {fix}"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise CheckpointError(
            f"{path}: tensor {name!r} has corrupt data_offsets {offsets!r} (not two integer "
            f"byte positions). {fix}"
        )
    start, stop = offsets
    if stop - start != math.prod(shape) * _DTYPE_BYTES[dtype]:
        raise CheckpointError(
            f"{path}: tensor {name!r} ({dtype} {shape}) does not match its byte range. {fix}"
        )
    return start, stop
