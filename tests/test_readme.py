"""Every code example in the README runs, against a tiny local model in place of the
Hub id (last round, two README examples failed for a new user).

Python blocks run in order in one namespace (later blocks use the model the first
one loaded); a block that talks to `granite-mlx serve` at 127.0.0.1:8080 gets a live
test server there. Shell blocks: every `granite-mlx` command line runs through the CLI
in-process, except the long-running ones (chat, serve), whose options are parsed.
"""

from __future__ import annotations

import re
from pathlib import Path

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
