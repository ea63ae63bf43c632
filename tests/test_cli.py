"""The granite-mlx command: generate streams the answer, user errors are one line."""

from __future__ import annotations

import io
import subprocess
import sys
import types

from test_generate import real_vocab, real_vocab_folder

from granite_mlx import cli, generate


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
    code, _, err = run(capsys, "generate", "--model", "m", "--prompt", "x")
    assert code == 130 and "Traceback" not in err


def test_chat_convert_and_bench_hand_their_arguments_over(capsys, monkeypatch):
    seen = {}
    for command, module in [
        ("chat", "granite_mlx.tui.app"),
        ("convert", "granite_mlx.convert.cli"),
        ("bench", "granite_mlx.bench"),
    ]:
        fake = types.ModuleType(module)
        fake.main = lambda argv, command=command: seen.setdefault(command, argv) and 0
        monkeypatch.setitem(sys.modules, module, fake)
        assert cli.main([command, "--flag", "value"]) == 0
    assert seen == {c: ["--flag", "value"] for c in ("chat", "convert", "bench")}


def test_a_missing_subcommand_module_is_a_user_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "granite_mlx.convert.cli", None)
    code, _, err = run(capsys, "convert", "--help")
    assert code == 1 and "not available" in err and "Traceback" not in err
