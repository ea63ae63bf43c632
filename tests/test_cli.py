"""The granite-mlx command: generate streams the answer, user errors are one line."""

from __future__ import annotations

import io
import subprocess
import sys
import types

import pytest
from test_generate import real_vocab, real_vocab_folder

from granite_mlx import cli, generate

generate_module = sys.modules["granite_mlx.generate"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_the_answer_and_prints_stats(capsys):
    folder = str(real_vocab_folder())
    code, out, err = run(
        capsys, "generate", "--model", folder, "--prompt", "Hello", "--max-tokens", "5",
        "--dtype", "float32",
    )  # fmt: skip
    assert code == 0
    model, tokenizer = real_vocab()
    expected = generate(model, tokenizer, [{"role": "user", "content": "Hello"}], max_tokens=5)
    assert out == expected + "\n"
    assert "prompt:" in err and "tok/s" in err and "peak memory" in err


def test_generate_reads_stdin_and_takes_a_system_prompt(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello"))
    folder = str(real_vocab_folder())
    code, out, _ = run(
        capsys, "generate", "--model", folder, "--prompt", "-", "--system", "Be brief.",
        "--max-tokens", "3", "--dtype", "float32", "--temp", "0.8", "--seed", "1",
    )  # fmt: skip
    assert code == 0
    model, tokenizer = real_vocab()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert out == generate(model, tokenizer, messages, max_tokens=3, temperature=0.8, seed=1) + "\n"


def test_user_errors_are_one_line_without_traceback(capsys, tmp_path):
    code, out, err = run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 1 and out == ""
    assert err.startswith("granite-mlx: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    # A model folder without a tokenizer is a user error too.
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((real_vocab_folder() / name).read_bytes())
    code, _, err = run(capsys, "generate", "--model", str(folder), "--prompt", "x")
    assert code == 1 and "tokenizer" in err and err.count("\n") == 1


def test_the_installed_entry_point_exits_1_on_a_user_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from granite_mlx.cli import main; sys.exit(main())",
         "generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "granite-mlx: error:" in result.stderr


def test_ctrl_c_exits_130_quietly(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["granite_mlx.generate"], "load", interrupted)
    code, _, err = run(capsys, "generate", "--model", str(real_vocab_folder()), "--prompt", "x")
    assert code == 130 and "Traceback" not in err


def test_chat_convert_bench_and_serve_hand_their_arguments_over(capsys, monkeypatch):
    seen = {}
    for command, module in [
        ("chat", "granite_mlx.tui.app"),
        ("convert", "granite_mlx.convert.cli"),
        ("bench", "granite_mlx.bench"),
        ("serve", "granite_mlx.serve.cli"),
    ]:
        fake = types.ModuleType(module)
        fake.main = lambda argv, command=command: seen.setdefault(command, argv) and 0
        monkeypatch.setitem(sys.modules, module, fake)
        assert cli.main([command, "--flag", "value"]) == 0
    assert seen == {c: ["--flag", "value"] for c in ("chat", "convert", "bench", "serve")}


def test_a_missing_subcommand_module_is_a_user_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "granite_mlx.convert.cli", None)
    code, _, err = run(capsys, "convert", "--help")
    assert code == 1 and "not available" in err and "Traceback" not in err


# --- Every bad option: one line, exit 1, and the model is never loaded -----------


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the weights would be loaded."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(generate_module, "load", load)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--seed", "-1"], "--seed: must be from 0 to 9223372036854775807, not -1"),
        (["--seed", "1e23"], "--seed: '1e23' is not a whole number"),
        (["--seed", "9223372036854775808"], "--seed: must be from 0"),
        (["--temperature", "nan"], "--temperature/--temp: must be a finite number, not 'nan'"),
        (["--temp", "inf"], "--temperature/--temp: must be a finite number, not 'inf'"),
        (["--temperature", "-0.5"], "--temperature must be 0 (greedy) or more, not -0.5"),
        (["--repetition-penalty", "nan"], "--repetition-penalty: must be a finite number"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be above 0"),
        (["--top-p", "0"], "--top-p must be above 0 and at most 1"),
        (["--top-p", "abc"], "--top-p: 'abc' is not a number"),
        (["--min-p", "1"], "--min-p must be from 0 up to (not including) 1"),
        (["--top-k", "-3"], "--top-k must be 0 (off) or more"),
        (["--top-k", "100353"], "--top-k 100353 is larger than the model's vocabulary (100352"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--max-tokens", "2.5"], "--max-tokens: '2.5' is not a whole number"),
        (["--dtype", "int8"], "--dtype: invalid choice"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text (a lone surrogate \\udce9"),
        (["--system", "\udcff"], "--system is not valid UTF-8 text"),
        (["--stop", "\udcff"], "is not valid UTF-8 text"),
        (["--parallel", "tensor", "--prompt-lookup", "2"], "do not work with --parallel yet"),
    ],
)
def test_bad_options_are_one_line_before_loading(capsys, no_loading, options, message):
    argv = ["generate", "--model", str(real_vocab_folder()), "--prompt", "x", *options]
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith("granite-mlx: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_missing_required_option_is_one_line(capsys):
    code, _, err = run(capsys, "generate", "--prompt", "x")
    assert code == 1 and "--model" in err and err.count("\n") == 1


def test_invalid_utf8_on_stdin_names_the_byte(capsys, monkeypatch, no_loading):
    stdin = types.SimpleNamespace(buffer=io.BytesIO(b"caf\xe9 au lait"))
    monkeypatch.setattr(sys, "stdin", stdin)
    code, _, err = run(capsys, "generate", "--model", str(real_vocab_folder()), "--prompt", "-")
    assert code == 1 and err.count("\n") == 1
    assert "not valid UTF-8 (byte 0xe9 at offset 3)" in err


def test_invalid_utf8_in_argv_of_the_real_command(tmp_path):
    """Python turns argv's invalid bytes into lone surrogates: refused, one line."""
    code = "import sys; from granite_mlx.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable.encode(), b"-c", code.encode(), b"generate", b"--model",
         str(real_vocab_folder()).encode(), b"--prompt", b"caf\xe9"],
        check=False, capture_output=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "--prompt is not valid UTF-8" in err and "Traceback" not in err


def test_utf8_on_stdin_is_read_as_bytes(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO("Hé".encode())))
    seen = {}

    def fake_stream(model, tokenizer, prompt, **kwargs):
        seen["prompt"] = prompt
        return iter(())

    monkeypatch.setattr(generate_module, "stream_generate", fake_stream)
    code, _, _ = run(capsys, "generate", "--model", str(real_vocab_folder()), "--prompt", "-")
    assert code == 0 and seen["prompt"][-1]["content"] == "Hé"
