"""`granite-mlx serve` as a user runs it: a subprocess that prints where it listens,
answers, and stops cleanly on SIGTERM with a stream in flight; user errors are one line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading

import openai
import pytest
from granite_mlx.serve.cli import banner, build_parser, main
from test_generate import EOS, real_vocab_folder


def start(*flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "granite_mlx.serve", "--model", str(real_vocab_folder()),
         "--port", "0", "--dtype", "float32", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def test_serve_prints_the_url_answers_and_stops_on_sigterm_mid_stream():
    proc = start("--max-batch", "2", "--log-requests")
    try:
        first = proc.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:(\d+))", first)
        assert match, first + proc.stderr.read()
        url = match.group(1)
        howto = proc.stdout.readline()
        assert f'OpenAI(base_url="{url}/v1"' in howto
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert client.models.list().data[0].id == real_vocab_folder().name

        # A stream that would run for thousands of tokens (EOS ruled out by logit_bias).
        stream = client.chat.completions.create(
            model=real_vocab_folder().name, messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4000, temperature=0, stream=True, logit_bias={str(EOS): -100},
        )  # fmt: skip
        chunks = iter(stream)
        next(chunks), next(chunks)
        errors: list[Exception] = []

        def read_rest() -> None:
            try:
                for _ in chunks:
                    pass
            except openai.APIError as exc:
                errors.append(exc)

        reader = threading.Thread(target=read_rest)
        reader.start()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == 0, proc.stderr.read()
        reader.join(30)
        assert errors and "shutting down" in str(errors[0])
        err = proc.stderr.read()
        assert "Stopped." in err and "Traceback" not in err
        assert "/v1/models 200" in err  # --log-requests: one line per request
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_taken_port_is_one_line_and_exit_1(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["--model", "unused", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{port}" in err and "--port" in err


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--max-batch", "0"], "--max-batch"),
        (["--prompt-cache-gb", "-1"], "--prompt-cache-gb"),
        (["--prompt-cache-gb", "nan"], "--prompt-cache-gb"),
        (["--max-queue", "2.5"], "--max-queue"),
        (["--api-key", " "], "--api-key"),
        (["--port", "70000"], "--port"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--parallel", "tensor", "--prompt-lookup", "3"], "do not work with --parallel yet"),
    ],
)
def test_bad_flags_are_one_line_and_exit_1(capsys, flags, words):
    assert main(flags) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and err.startswith("granite-mlx serve: error:")


def test_banner_warns_when_reachable_from_the_network():
    assert "reachable" not in banner("m", "127.0.0.1", 8080, None)
    wide = banner("m", "0.0.0.0", 8080, None)
    assert "reachable from other machines by anyone" in wide and "http://127.0.0.1:8080" in wide
    assert "by anyone" not in banner("m", "0.0.0.0", 8080, "key")


def test_defaults_serve_loopback_on_8080_with_a_prompt_cache():
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8080, None)
    assert args.prompt_cache_gb > 0
