"""`granite-mlx models`, `pull`, `rm` against a Hugging Face cache folder built here.

The folder has the layout huggingface_hub writes (models--org--name/{blobs,refs,snapshots},
snapshot files as symlinks to blobs), so its own ``scan_cache_dir`` reads it; the Hub is
never contacted (offline mode; pull's download is replaced where a download is needed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants as hf_constants
import pytest
from fake_hf_cache import add_repo

from granite_mlx import hub_cache
from granite_mlx.cli import main

GRANITE = {"model_type": "granitemoehybrid", "torch_dtype": "bfloat16"}
QUANTIZED = {**GRANITE, "quantization": {"group_size": 64, "bits": 4}}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return folder


def fill(cache: Path) -> None:
    add_repo(
        cache,
        "ibm-granite/granite-4.0-h-350m",
        {"config.json": json.dumps(GRANITE).encode(), "model.safetensors": b"w" * 7_000_000},
    )
    add_repo(
        cache,
        "someone/granite-4.0-h-350m-4bit",
        {"config.json": json.dumps(QUANTIZED).encode(), "model.safetensors": b"q" * 2_000_000},
    )
    add_repo(
        cache,
        "other/llama",
        {"config.json": json.dumps({"model_type": "llama"}).encode(), "w.bin": b"x" * 10},
    )


def test_models_lists_cached_granite_models_with_sizes_and_weights(cache, capsys):
    fill(cache)
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["REPO", "SIZE", "WEIGHTS"]
    rows = [line.split(None, 1) for line in lines[1:]]
    # Largest first; sizes from the cache scan (blob bytes); the non-Granite repo left out.
    assert [r[0] for r in rows] == [
        "ibm-granite/granite-4.0-h-350m",
        "someone/granite-4.0-h-350m-4bit",
    ]
    assert rows[0][1].split(None, 2) == ["7.0", "MB", "bfloat16"]
    assert rows[1][1].split(None, 2) == ["2.0", "MB", "4-bit (group 64)"]


def test_models_all_includes_other_repos(cache, capsys):
    fill(cache)
    assert main(["models", "--all"]) == 0
    out = capsys.readouterr().out
    assert "other/llama" in out and "(not Granite 4.0)" in out


def test_models_without_a_cache_says_how_to_get_one(cache, capsys):
    cache.rmdir()
    assert main(["models"]) == 0
    assert "granite-mlx pull ibm-granite/granite-4.0-h-350m" in capsys.readouterr().out


def test_cached_models_for_the_chat_app(cache):
    fill(cache)
    models = hub_cache.cached_models()
    assert models[0].repo_id == "ibm-granite/granite-4.0-h-350m"
    assert models[0].path.parent == cache / "models--ibm-granite--granite-4.0-h-350m" / "snapshots"
    assert (models[0].path / "config.json").is_file()


def test_rm_removes_the_repo_through_the_cache_api(cache, capsys):
    fill(cache)
    assert main(["rm", "someone/granite-4.0-h-350m-4bit"]) == 0
    assert capsys.readouterr().out.strip() == (
        "Removed someone/granite-4.0-h-350m-4bit (2.0 MB freed)."
    )
    assert not (cache / "models--someone--granite-4.0-h-350m-4bit").exists()
    assert [m.repo_id for m in hub_cache.cached_models()] == ["ibm-granite/granite-4.0-h-350m"]


def test_rm_of_a_repo_not_in_the_cache_is_one_line(cache, capsys):
    fill(cache)
    assert main(["rm", "nobody/nothing"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nobody/nothing is not in the Hugging Face cache" in err
    assert "granite-mlx models" in err


def test_pull_offline_and_not_cached_is_one_line(cache, capsys):
    assert main(["pull", "ibm-granite/granite-4.0-h-1b"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "Could not download ibm-granite/granite-4.0-h-1b" in err and "offline" in err


def test_pull_shows_byte_progress_and_where_the_model_is(cache, capsys, monkeypatch):
    calls = {}

    def fake_download(repo_id, *, allow_patterns, tqdm_class):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns)
        bar = tqdm_class(desc="model.safetensors", total=80_000_000, unit="B")
        for _ in range(4):
            bar.update(20_000_000)
        bar.close()
        return str(add_repo(cache, repo_id, {"config.json": json.dumps(GRANITE).encode()}))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert main(["pull", "ibm-granite/granite-4.0-h-1b"]) == 0
    out, err = capsys.readouterr()
    assert calls["repo_id"] == "ibm-granite/granite-4.0-h-1b"
    assert "*.safetensors" in calls["allow_patterns"]
    assert "80.0M/80.0M" in err and "B/s" in err  # bytes done/total and the speed
    assert out.startswith("ibm-granite/granite-4.0-h-1b is in the cache: ")


def test_cli_process_with_hf_hub_cache_env(tmp_path: Path):
    """The installed command, with the cache named by HF_HUB_CACHE as users set it."""
    cache = tmp_path / "hub"
    fill(cache)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from granite_mlx.cli import main; sys.exit(main())"]
        + ["models"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "someone/granite-4.0-h-350m-4bit" in result.stdout
