"""A Hugging Face cache folder written by hand, in the layout huggingface_hub uses
(models--org--name/{blobs,refs,snapshots}, snapshot files as symlinks to blobs), so that
its own scan_cache_dir and delete_revisions work on it without the Hub."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Write one cached model repo as huggingface_hub lays it out; return its snapshot."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # unique per repo, as on the Hub
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return snapshot
