"""Uploading a converted folder, without a network: an injected fake Hub client."""

import pytest
from conftest import checkpoint
from granite_mlx.convert import UploadError, cli, convert
from granite_mlx.convert.upload import upload

TOKEN = "hf_NotARealTokenButSecret1234567890"


class FakeHub:
    """Records what huggingface_hub.HfApi would have been asked to do."""

    def __init__(self, fail: Exception | None = None):
        self.calls = []
        self.fail = fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        if self.fail is not None:
            raise self.fail
        return "commit"


def run(out, **options):
    lines = []
    convert(checkpoint("hybrid_nope"), out, q_bits=4, progress=False, log=lines.append, **options)
    return "\n".join(lines)


def test_upload_creates_the_repo_and_uploads_the_folder(tmp_path):
    hub, out = FakeHub(), tmp_path / "out"
    run(out, upload_repo="me/granite-test", client=hub)
    (create, repo, kw), (upload_call, repo2, kw2) = hub.calls
    assert (create, repo, kw["exist_ok"], kw["repo_type"]) == (
        "create_repo",
        "me/granite-test",
        True,
        "model",
    )
    assert (upload_call, repo2, kw2["folder_path"]) == (
        "upload_folder",
        "me/granite-test",
        str(out),
    )
    assert "token" not in kw and "token" not in kw2  # huggingface_hub finds the login itself
    assert "me/granite-test" in (out / "README.md").read_text()  # the card's snippets use it


def test_dry_run_lists_files_and_makes_no_calls(tmp_path):
    hub, out = FakeHub(), tmp_path / "out"
    text = run(out, upload_repo="me/granite-test", client=hub, dry_run=True)
    assert hub.calls == []
    assert "https://huggingface.co/me/granite-test" in text and "nothing was uploaded" in text
    for name in ("model.safetensors", "config.json", "README.md", "quality.json"):
        assert name in text
    assert " kB" in text  # sizes are listed


def test_failed_upload_is_reported_and_the_folder_stays(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub, out = FakeHub(fail=RuntimeError(f"401 Unauthorized: bad token {TOKEN}")), tmp_path / "out"
    with pytest.raises(UploadError) as info:
        run(out, upload_repo="me/granite-test", client=hub)
    message = str(info.value)
    assert "401 Unauthorized" in message and "hf auth login" in message and str(out) in message
    assert TOKEN not in message
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_cli_upload_failure_exits_1_and_never_prints_the_token(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    hub = FakeHub(fail=OSError(f"connection refused (token={TOKEN})"))
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)  # the default client
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    code = cli.main(
        [
            str(checkpoint("hybrid_nope")),
            str(out),
            "--q-bits",
            "4",
            "--quiet",
            "--upload-repo",
            "me/granite-test",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert "Upload to me/granite-test failed" in captured.err
    assert captured.err.strip().count("\n") == 0
    assert TOKEN not in captured.out + captured.err
    assert (out / "config.json").is_file()


def test_explicit_token_is_passed_to_the_client_and_not_printed(tmp_path):
    run(tmp_path / "out")
    hub, lines = FakeHub(), []
    upload(tmp_path / "out", "me/x", client=hub, token=TOKEN, log=lines.append)
    assert all(call[2]["token"] == TOKEN for call in hub.calls)
    assert TOKEN not in "\n".join(lines)


def test_bad_repo_name_is_refused_before_converting(tmp_path):
    with pytest.raises(UploadError, match="not a Hugging Face repo name"):
        run(tmp_path / "out", upload_repo="bad name/with spaces", client=FakeHub())
    assert not (tmp_path / "out").exists()


# --- `granite-mlx upload OUT --repo NAME`, and --dry-run without converting again ----


@pytest.fixture
def converted(tmp_path):
    out = tmp_path / "out"
    convert(checkpoint("hybrid_nope"), out, q_bits=4, check_quality=False, progress=False,
            log=lambda _: None)  # fmt: skip
    return out


@pytest.fixture
def default_hub(monkeypatch):
    import huggingface_hub

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    return hub


def test_upload_command_uploads_a_converted_folder(converted, default_hub, capsys):
    from granite_mlx import cli as main_cli

    assert main_cli.main(["upload", str(converted), "--repo", "me/granite-test", "--private"]) == 0
    (create, repo, kw), (upload_call, _, kw2) = default_hub.calls
    assert (create, repo, kw["private"], upload_call) == (
        "create_repo", "me/granite-test", True, "upload_folder"
    )
    assert kw2["folder_path"] == str(converted)
    assert "Uploaded to https://huggingface.co/me/granite-test" in capsys.readouterr().out


def test_upload_command_dry_run_lists_and_calls_nothing(converted, default_hub, capsys):
    from granite_mlx import cli as main_cli

    assert main_cli.main(["upload", str(converted), "--repo", "me/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert default_hub.calls == [] and "nothing was uploaded" in out
    assert "model.safetensors" in out and "README.md" in out


@pytest.mark.parametrize(
    "what, message",
    [
        ("missing", "is not a folder"),
        ("empty", "has no config.json"),
        ("source", "no model card"),  # a checkpoint folder, never converted
        ("truncated", "is not a complete converted model"),
    ],
)
def test_upload_command_refuses_what_is_not_a_converted_model(
    tmp_path, converted, default_hub, capsys, what, message
):
    import shutil

    from granite_mlx import cli as main_cli

    folder = tmp_path / what
    if what == "empty":
        folder.mkdir()
    elif what == "source":
        shutil.copytree(checkpoint("hybrid_nope"), folder)
    elif what == "truncated":
        shutil.copytree(converted, folder)
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    assert main_cli.main(["upload", str(folder), "--repo", "me/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("granite-mlx upload: error: ") and message in err and "\n" not in err
    assert default_hub.calls == []


def test_upload_command_needs_a_repo(converted, capsys):
    from granite_mlx import cli as main_cli

    assert main_cli.main(["upload", str(converted)]) == 1
    assert "--repo" in capsys.readouterr().err


def test_dry_run_with_an_existing_output_lists_it_without_converting(
    converted, default_hub, capsys, monkeypatch
):
    from granite_mlx.convert import cli as convert_cli

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(convert_cli, "convert", no_conversion)
    argv = [str(checkpoint("hybrid_nope")), str(converted), "--upload-repo", "me/x", "--dry-run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "exists: listing it as it is, nothing was converted" in out
    assert "model.safetensors" in out and "nothing was uploaded" in out
    assert default_hub.calls == []
    # Bad options are still refused first.
    assert cli.main([*argv, "--q-bits", "3"]) == 1
