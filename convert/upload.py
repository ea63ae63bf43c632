"""Upload a converted folder to the Hugging Face Hub.

The client is injectable (anything with huggingface_hub.HfApi's `create_repo`
and `upload_folder`), so tests run without a network. The token comes from
the usual places (`hf auth login`, or HF_TOKEN), read by huggingface_hub
itself; it is never printed, and is blanked out of error messages.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from granite_mlx.config import ModelArgs
from granite_mlx.errors import GraniteError
from granite_mlx.loading import load_config, weight_files
from granite_mlx.safetensors_check import check_safetensors

from .errors import ConvertError, UploadError
from .writer import folder_files, human_size

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class HubClient(Protocol):
    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, **kwargs: Any) -> Any: ...


@dataclass
class UploadPlan:
    repo_id: str
    folder: Path
    files: list[tuple[str, int]]  # (path inside the folder, bytes)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        lines = [
            (
                f"Would upload {len(self.files)} files ({human_size(self.total_bytes)}) from {self.folder} "
                f"to https://huggingface.co/{self.repo_id}:"
            )
        ]
        lines += [f"  {name:<48} {human_size(size):>10}" for name, size in self.files]
        return "\n".join(lines)


def check_repo_id(repo_id: str) -> None:
    """Refuse a malformed repo name before any work is done."""
    if not _REPO_ID.match(repo_id) or len(repo_id) > 96 or ".." in repo_id:
        raise UploadError(
            f"{repo_id!r} is not a Hugging Face repo name; use NAME or OWNER/NAME "
            "(letters, digits, '-', '_', '.')."
        )


def check_converted(folder: Path) -> None:
    """Refuse to upload a folder that is not a complete model: a Granite config,
    weights whose headers are whole, a model card."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertError(f"{folder} is not a folder; pass the output folder of a conversion.")
    try:
        ModelArgs.from_dict(load_config(folder))
        for path in weight_files(folder):
            check_safetensors(path)
    except GraniteError as e:
        raise ConvertError(
            f"{folder} is not a complete converted model ({e}); convert again before uploading."
        ) from None
    if not (folder / "README.md").is_file():
        raise ConvertError(
            f"{folder} has no model card (README.md); is it the output of `granite-mlx convert`?"
        )


def plan_upload(folder: Path, repo_id: str) -> UploadPlan:
    check_repo_id(repo_id)
    return UploadPlan(repo_id, Path(folder), folder_files(Path(folder)))


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def upload(
    folder: Path,
    repo_id: str,
    *,
    client: HubClient | None = None,
    token: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> UploadPlan:
    """Create `repo_id` (if needed) and upload `folder` to it; `dry_run` only lists.

    token: None lets huggingface_hub find the login (HF_TOKEN or `hf auth login`).
    Raises UploadError (with the token blanked out) when the Hub refuses.
    """
    plan = plan_upload(folder, repo_id)
    if dry_run:
        log(plan.describe())
        log("Dry run: nothing was uploaded.")
        return plan
    if client is None:
        from huggingface_hub import HfApi

        client = HfApi()
    auth = {"token": token} if token else {}
    log(
        f"Uploading {len(plan.files)} files ({human_size(plan.total_bytes)}) to "
        f"https://huggingface.co/{repo_id} ..."
    )
    try:
        client.create_repo(repo_id, repo_type="model", private=private, exist_ok=True, **auth)
        client.upload_folder(
            repo_id=repo_id,
            folder_path=str(plan.folder),
            repo_type="model",
            commit_message="Upload Granite 4.0 model converted with granite-mlx",
            **auth,
        )
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many HTTP and OS error types
        detail = _scrub(
            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
            [token or "", os.environ.get("HF_TOKEN", "")],
        )
        raise UploadError(
            f"Upload to {repo_id} failed ({type(e).__name__}: {detail}). The converted model "
            f"is still at {plan.folder}: log in with `hf auth login` (or set HF_TOKEN), check "
            f"the repo name and your write access, then run `hf upload {repo_id} {plan.folder}`."
        ) from None
    log(f"Uploaded to https://huggingface.co/{repo_id}")
    return plan
