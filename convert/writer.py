"""Writing a converted checkpoint: a staging folder, shards, config, side files.

Everything is written into a hidden staging folder next to OUT
(`.OUT.partial-<pid>-<random>`) and renamed to OUT only once complete, so an
interrupted conversion never leaves a folder that looks finished. A staging
folder left by a killed process is removed by the next conversion to the same
OUT; with --force an existing OUT is replaced only after the new one is done.

Replacing takes two renames: OUT -> `.OUT.old-<pid>-<random>`, then staging ->
OUT. A process killed between them leaves no OUT and the only copy of the
previous output in the `.old-` folder, so the next run to OUT puts that folder
back as OUT (`recover_output`) before anything else; an `.old-` folder is only
ever deleted while an OUT exists beside it.

A write that fails (a full disk, a file-size limit; MLX reports both as a
RuntimeError, not an OSError) is a ConvertError, and the staging folder goes
with it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm.auto import tqdm

from .errors import ConvertError, OutputExistsError, WriteError

MAX_SHARD_BYTES = 5 * 10**9  # 5 GB per safetensors file
INDEX_FILE = "model.safetensors.index.json"
# Copied as they are when the source has them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# Test hook: seconds to sleep after each shard, so a test can kill a conversion midway.
PAUSE_ENV = "GRANITE_MLX_CONVERT_PAUSE_AFTER_SHARD"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(partial|old)-(?P<pid>\d+)-\w+$")


def check_target(out: Path, force: bool) -> None:
    """Refuse an existing OUT unless `force`; refuse a file where a folder must go."""
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputExistsError(
                f"{out} exists and is not a folder; choose another output path."
            )
        if not force:
            raise OutputExistsError(
                f"{out} already exists. Pass --force to replace it (it is replaced only once "
                "the new conversion is complete), or choose another output folder."
            )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _leftovers(out: Path) -> list[tuple[Path, str]]:
    """(folder, "partial" | "old") left next to `out` by conversions no longer running."""
    if not out.parent.is_dir():
        return []
    found = []
    for entry in sorted(out.parent.iterdir()):
        m = _PARTIAL.match(entry.name)
        if m and m["name"] == out.name and entry.is_dir() and not _pid_alive(int(m["pid"])):
            found.append((entry, m.group(2)))
    return found


def recover_output(out: Path) -> Path | None:
    """Put back the previous output a conversion killed between its two publishing
    renames left as `.OUT.old-*` (when OUT itself is missing). Returns it, or None."""
    if out.exists() or out.is_symlink():
        return None
    for entry, kind in _leftovers(out):
        if kind == "old":
            entry.rename(out)
            return out
    return None


def remove_stale_staging(out: Path) -> None:
    """Remove what conversions to `out` that are no longer running left behind:
    staging folders, and `.old-` folders once an OUT stands beside them."""
    recover_output(out)
    for entry, kind in _leftovers(out):
        if kind == "partial" or out.exists():
            shutil.rmtree(entry, ignore_errors=True)


def _publish(staging: Path, out: Path, force: bool) -> None:
    """Move the finished staging folder to `out`, replacing an old one if allowed."""
    check_target(out, force)  # again: something may have appeared meanwhile
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        old.rmdir()
        out.rename(old)
    try:
        staging.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)  # put the previous conversion back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes `out`, on failure it goes.

    The caller writes everything into the yielded folder. Any exception (a
    failed quality check included) removes it and leaves `out` as it was.
    """
    check_target(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"Cannot create {out.parent}: {e.strerror or e}.") from None
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0o700 would make OUT private
        yield staging
        _publish(staging, out, force)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):  # ENOSPC, EFBIG, EIO while writing a side file
            where = Path(e.filename).name if e.filename else str(out)
            raise WriteError(where, e.strerror or str(e)) from None
        raise


def plan_shards(weights: dict[str, mx.array], max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in name order, each shard at most `max_bytes`
    (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = []
    size = 0
    for name in sorted(weights):
        n = weights[name].nbytes
        if not shards or (size + n > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_shards(
    weights: dict[str, mx.array],
    folder: Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = True,
) -> list[str]:
    """Write `weights` as safetensors shards plus model.safetensors.index.json.

    Names start with "model" (mlx-lm's loader globs model*.safetensors).
    Returns the shard file names.
    """
    shards = plan_shards(weights, max_shard_bytes)
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    weight_map = {}
    total = sum(w.nbytes for w in weights.values())
    with tqdm(total=total, desc="writing", unit="B", unit_scale=True, disable=not progress) as bar:
        for file_name, keys in zip(names, shards):
            shard = {k: weights[k] for k in keys}
            try:
                mx.save_safetensors(str(folder / file_name), shard, metadata={"format": "mlx"})
            except RuntimeError as e:  # MLX: "[write] Unable to write N bytes to file."
                raise WriteError(file_name, str(e)) from None
            weight_map.update(dict.fromkeys(keys, file_name))
            bar.update(sum(w.nbytes for w in shard.values()))
            if pause:
                time.sleep(pause)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _tag_nonfinite(value: Any) -> Any:
    """inf/nan as {"__float__": "Infinity"}: valid JSON that transformers 5, mlx-lm and
    granite-mlx all read back as the float."""
    if isinstance(value, float) and not math.isfinite(value):
        return {
            "__float__": "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        }
    if isinstance(value, dict):
        return {k: _tag_nonfinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tag_nonfinite(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(_tag_nonfinite(data), indent=2, ensure_ascii=False) + "\n")


def copy_side_files(src: Path, dst: Path, config: dict[str, Any]) -> list[str]:
    """Tokenizer files and chat template (as the source has them) and
    generation_config.json (the source's, or one made from config's token ids)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")
    else:
        ids = {
            k: config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if config.get(k) is not None
        }
        write_json(dst / "generation_config.json", ids)
    copied.append("generation_config.json")
    return copied


def human_size(n: int) -> str:
    """Bytes in decimal units: "1.23 GB", "456.00 kB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file under `folder`, sorted."""
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file()
    )
