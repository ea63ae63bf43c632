"""Every code example in the README runs, against a tiny local model in place of the
Hub id (last round, two README examples failed for a new user).

Python blocks run in order in one namespace (later blocks use the model the first
one loaded); a block that talks to `granite-mlx serve` at 127.0.0.1:8080 gets a live
test server there. Shell blocks: every `granite-mlx` command line runs through the CLI
in-process, except the long-running ones (chat, serve), whose options are parsed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_generate import real_vocab_folder

README = Path(__file__).resolve().parent.parent / "README.md"
HUB_ID = "ibm-granite/granite-4.0-h-350m"
SERVER_URL = "http://127.0.0.1:8080"


def blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_readme_has_examples():
    assert blocks("python") and blocks("bash")


def test_python_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = str(real_vocab_folder())
    namespace: dict = {"__name__": "__readme__"}
    server = None
    try:
        for i, code in enumerate(blocks("python")):
            code = code.replace(f'"{HUB_ID}"', repr(folder))
            if SERVER_URL in code:  # a client of `granite-mlx serve`: give it a live one
                from serve_helpers import LiveServer

                server = server or LiveServer(max_batch=2, model_id=folder)
                code = code.replace(SERVER_URL, server.url)
            try:
                # dont_inherit: run as a script would, not under this file's `from __future__`
                exec(compile(code, f"README.md python block {i}", "exec", dont_inherit=True),
                     namespace)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - name the block that failed
                pytest.fail(f"README python block {i} failed: {type(exc).__name__}: {exc}\n{code}")
    finally:
        if server is not None:
            server.stop()
    assert capsys.readouterr().out


# --------------------------------------------------------------------------
# Shell blocks
# --------------------------------------------------------------------------

# Lines no test can run, and why (each is still checked to be one of these).
NOT_RUN = {
    "pip install": "installing the project: .ci/run does exactly this on a fresh machine",
    "python -m pytest": "the test suite itself: CI runs it",
    "mlx.distributed_config": "needs two Macs joined by Thunderbolt",
}


def shell_lines() -> list[list[str]]:
    """Every command line of the README's shell blocks, as argv (continuations joined,
    comments dropped)."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append(argv)
    return out


class Places:
    """Stand-ins for the README's names: the tiny local model, fresh output folders."""

    def __init__(self, tmp: Path, model: str):
        self.tmp, self.model, self.outputs = tmp, model, 0
        self.last_out: str | None = None

    def model_like(self, word: str) -> bool:
        return word in (HUB_ID, "M", "SRC", "/path/to/checkpoint-or-repo-id") or word.startswith(
            ("./granite-4.0-h-1b", "~/models/")
        )

    def out(self) -> str:
        self.outputs += 1
        self.last_out = str(self.tmp / f"out{self.outputs}")
        return self.last_out

    def substitute(self, argv: list[str]) -> list[str]:
        res = []
        for i, word in enumerate(argv):
            if self.model_like(word):
                word = self.model
            elif word == "OUT" or (word.startswith("./") and word.endswith("-4bit")):
                # `upload OUT` publishes the folder the last convert wrote.
                word = self.last_out if argv[1] == "upload" else self.out()
            elif word == "[--dry-run]":
                word = "--dry-run"
            res.append(word)
        return res


def run_cli(argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
    """granite-mlx in this process (as the console script runs it)."""
    import contextlib
    import io

    from granite_mlx.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    try:
        sys.stdin = io.TextIOWrapper(io.BytesIO((stdin or "").encode()), encoding="utf-8")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def run_chat_app(argv: list[str], data_dir: Path) -> str:
    """`granite-mlx chat ...` for real, headless: load the model, send one message, read the
    answer off the screen."""
    sys.path.append(str(Path(__file__).parent / "tui"))
    from granite_mlx.tui.app import app_from_args, build_parser
    from tui_pilot_helpers import key, stream_some, wait_answer, wait_ready

    app = app_from_args(build_parser().parse_args([*argv, "--data-dir", str(data_dir)]))

    async def drive() -> str:
        async with app.run_test(size=(100, 40)) as pilot:
            await wait_ready(pilot)
            answer = await stream_some(pilot, chars=10, text="Hi")
            await key(pilot, "escape")  # the model is random: stop it after some text
            await wait_answer(pilot)
            return answer.content

    return asyncio.run(drive())


class ServeProcess:
    """`granite-mlx serve ...` as its own process, on a free loopback port."""

    def __init__(self, argv: list[str]):
        port = free_port()
        args = list(argv)
        if "--host" in args:  # the tests reach loopback only
            args[args.index("--host") + 1] = "127.0.0.1"
        if "--port" in args:
            args[args.index("--port") + 1] = str(port)
        else:
            args += ["--port", str(port)]
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "KEY": "secret-key"}
        args = [os.path.expandvars(a) if "$" in a else a for a in args]
        self.key = "secret-key" if "--api-key" in args else None
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from granite_mlx.cli import main; sys.exit(main())",
             *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"{args} did not start: {self.proc.stdout.read()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, out
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_hub_cache(folder: Path, model_folder: Path) -> None:
    """A Hugging Face cache holding the default model (as after its first download) and the
    README's `pull` example, both as the tiny model."""
    from fake_hf_cache import add_repo

    files = {p.name: p.read_bytes() for p in model_folder.iterdir() if p.is_file()}
    for repo in (HUB_ID, "ibm-granite/granite-4.0-h-1b"):
        add_repo(folder, repo, files)


def test_shell_examples_run(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    model = real_vocab_folder()
    places = Places(tmp_path, str(model))
    hub = tmp_path / "hub"
    hub.mkdir()
    fake_hub_cache(hub, model)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    lines = shell_lines()
    assert any(a[0] == "granite-mlx" for a in lines)
    server = None
    pending_curls = []
    try:
        for argv in lines:
            where = " ".join(argv)
            if any(where.startswith(prefix) for prefix in NOT_RUN):
                continue
            if argv[0] == "echo":  # echo TEXT | granite-mlx ...
                bar = argv.index("|")
                stdin, argv = argv[1], argv[bar + 1 :]
            else:
                stdin = None
            if argv[0] == "mlx.launch":  # across Macs: each rank's command runs as one rank
                inner = argv[argv.index("--") + 1 :]
                assert inner[0].endswith("granite-mlx"), where
                inner = places.substitute(["granite-mlx", *inner[1:]])
                if inner[1] == "serve":
                    ServeProcess(inner[1:]).stop()
                else:
                    assert inner[1] == "generate", where
                    code, out, err = run_cli(inner[1:])
                    assert code == 0 and out.strip(), (where, err)
                continue
            if argv[0] == "curl":
                pending_curls.append(argv)
                continue
            assert argv[0] == "granite-mlx", f"README line not covered by this test: {where}"
            argv = places.substitute(argv)
            command = argv[1] if len(argv) > 1 else ""
            if command == "chat":
                answer = run_chat_app(argv[2:] or [], tmp_path / f"chat{len(argv)}")
                assert answer, where
            elif command == "serve":
                started = ServeProcess(argv[1:])
                if server is None and started.key is None:
                    server = started  # kept for the curl examples
                else:
                    started.stop()
            else:
                code, out, err = run_cli(argv[1:], stdin)
                assert code == 0, (where, err)
        assert pending_curls and server is not None
        for argv in pending_curls:
            argv = [a.replace("http://127.0.0.1:8080", server.url) for a in argv]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0 and '"done":true' in done.stdout.replace(" ", ""), (
                argv, done.stdout[-500:], done.stderr[-500:])  # fmt: skip
    finally:
        if server is not None and server.proc.poll() is None:
            server.stop()
