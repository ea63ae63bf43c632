"""The Granite models in the local Hugging Face cache: ``granite-mlx models``, ``pull``, ``rm``.

Everything goes through huggingface_hub's cache API (``scan_cache_dir`` to list,
``snapshot_download`` to fetch, ``delete_revisions`` to remove), so the cache's own
rules (blobs shared between revisions, refs, incomplete downloads) are respected and
nothing walks its folders by hand. The cache is wherever huggingface_hub puts it
(``HF_HUB_CACHE``, ``HF_HOME``); ``HF_HUB_OFFLINE=1`` keeps everything local.

The chat app lists the same models in its model switcher (``cached_models``).
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli import ArgumentParser  # one-line errors, like every granite-mlx command
from .errors import GraniteError

GRANITE_MODEL_TYPES = ("granitemoehybrid",)  # every Granite 4.0 checkpoint (GRANITE.md)
EXAMPLE_REPO = "ibm-granite/granite-4.0-h-350m"


class HubCacheError(GraniteError):
    """The cache cannot do what was asked (a repo that is not there, a failed download)."""


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    size_on_disk: int  # bytes, all revisions (blobs they share counted once)
    path: Path  # the newest revision's snapshot folder: what to load
    weights: str  # "4-bit (group 64)", "bfloat16", ... from config.json
    granite: bool  # config.json says a Granite 4.0 model
    last_accessed: float


def format_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit in ("B", "KB") else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def describe_weights(config: dict[str, Any]) -> str:
    """How the weights are stored, from config.json: quantized bits or the float dtype."""
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and "bits" in quant:
        group = f" (group {quant['group_size']})" if "group_size" in quant else ""
        return f"{quant['bits']}-bit{group}"
    dtype = config.get("torch_dtype") or config.get("dtype")
    return str(dtype) if dtype else "unquantized"


def _scan() -> Any | None:
    """huggingface_hub's view of the cache, or None when there is no cache yet."""
    from huggingface_hub import constants, scan_cache_dir

    try:  # the folder read now (scan_cache_dir's default is fixed when it is imported)
        return scan_cache_dir(constants.HF_HUB_CACHE)
    except Exception as exc:  # noqa: BLE001 - CacheNotFound moved between versions
        if type(exc).__name__ == "CacheNotFound":
            return None
        raise HubCacheError(f"Cannot read the Hugging Face cache: {exc}") from None


def _read_config(revision: Any) -> dict[str, Any]:
    for file in revision.files:
        if file.file_name == "config.json":
            try:
                config = json.loads(Path(file.file_path).read_text())
            except (OSError, ValueError):
                return {}
            return config if isinstance(config, dict) else {}
    return {}


def cached_models(granite_only: bool = True) -> list[CachedModel]:
    """Model repos in the cache, largest first; only Granite 4.0 ones unless asked."""
    info = _scan()
    if info is None:
        return []
    models = []
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified)
        config = _read_config(newest)
        granite = config.get("model_type") in GRANITE_MODEL_TYPES
        if granite_only and not granite:
            continue
        models.append(
            CachedModel(
                repo_id=repo.repo_id,
                size_on_disk=repo.size_on_disk,
                path=Path(newest.snapshot_path),
                weights=describe_weights(config),
                granite=granite,
                last_accessed=repo.last_accessed,
            )
        )
    return sorted(models, key=lambda m: (-m.size_on_disk, m.repo_id))


def remove(repo_id: str) -> int:
    """Delete every cached revision of ``repo_id``; return the bytes freed."""
    info = _scan()
    repo = None
    if info is not None:
        repo = next(
            (r for r in info.repos if r.repo_id == repo_id and r.repo_type == "model"), None
        )
    if repo is None:
        raise HubCacheError(
            f"{repo_id} is not in the Hugging Face cache; `granite-mlx models` lists what is."
        )
    strategy = info.delete_revisions(*(r.commit_hash for r in repo.revisions))
    strategy.execute()
    return int(strategy.expected_freed_size)


def reporting_progress_class(report: Callable[[str, float, float | None], None]) -> type:
    """A tqdm class for snapshot_download that hands byte progress to ``report``
    (description, done, total) instead of drawing it (the chat app owns the terminal)."""
    from tqdm.auto import tqdm

    class ReportingBar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs.update(disable=False, file=io.StringIO())
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            # Report bytes written; skip the parallel "bytes over the network" bar.
            desc = self.desc or ""
            if self.unit == "B" and not desc.startswith("Downloading bytes"):
                report(desc or "Downloading", self.n, self.total or None)
            return shown

    return ReportingBar


def terminal_progress_class() -> type:
    """A tqdm class for snapshot_download that draws byte bars (size, speed) on stderr."""
    from tqdm.auto import tqdm

    class TerminalBar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs.update(disable=False, file=sys.stderr, mininterval=0.2)
            if kwargs.get("unit") == "B":
                kwargs.update(unit_scale=True, unit_divisor=1000)
            super().__init__(*args, **kwargs)

    return TerminalBar


def pull(repo_id: str, progress: type | None = None) -> Path:
    """Download ``repo_id``'s checkpoint files into the cache (or find them there)."""
    from huggingface_hub import snapshot_download

    from .loading import HUB_FILES

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, tqdm_class=progress))
    except Exception as exc:  # noqa: BLE001 - the Hub raises many types; name the cause
        name = type(exc).__name__
        if name == "GatedRepoError":
            hint = "it is gated: accept its terms on the model page and log in (hf auth login)"
        elif name == "RepositoryNotFoundError":
            hint = "the Hub has no such model (or it is private): check the name"
        elif name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            hint = "it is not in the cache and the Hub cannot be reached (offline)"
        else:
            hint = f"{name}: {exc}".splitlines()[0]
        raise HubCacheError(f"Could not download {repo_id}: {hint}.") from None


# --- the commands ---------------------------------------------------------------------


def models_main(argv: Sequence[str]) -> int:

    parser = ArgumentParser(
        prog="granite-mlx models",
        description="List the Granite 4.0 models in the Hugging Face cache, with their sizes.",
    )
    parser.add_argument("--all", action="store_true", help="list every model repo in the cache")
    args = parser.parse_args(argv)
    models = cached_models(granite_only=not args.all)
    if not models:
        print(
            "No Granite models in the Hugging Face cache. Download one with: "
            f"granite-mlx pull {EXAMPLE_REPO}"
        )
        return 0
    width = max(len("REPO"), *(len(m.repo_id) for m in models))
    print(f"{'REPO':<{width}}  {'SIZE':>9}  WEIGHTS")
    for m in models:
        weights = m.weights if m.granite else f"{m.weights} (not Granite 4.0)"
        print(f"{m.repo_id:<{width}}  {format_size(m.size_on_disk):>9}  {weights}")
    return 0


def pull_main(argv: Sequence[str]) -> int:

    parser = ArgumentParser(
        prog="granite-mlx pull",
        description="Download a model from the Hugging Face Hub into the local cache.",
    )
    parser.add_argument("repo", metavar="REPO", help=f"a Hub repo id, e.g. {EXAMPLE_REPO}")
    args = parser.parse_args(argv)
    path = pull(args.repo, progress=terminal_progress_class())
    print(f"{args.repo} is in the cache: {path}")
    return 0


def rm_main(argv: Sequence[str]) -> int:

    parser = ArgumentParser(
        prog="granite-mlx rm", description="Remove a model from the Hugging Face cache."
    )
    parser.add_argument("repo", metavar="REPO", help="a repo id, as `granite-mlx models` lists it")
    args = parser.parse_args(argv)
    freed = remove(args.repo)
    print(f"Removed {args.repo} ({format_size(freed)} freed).")
    return 0
