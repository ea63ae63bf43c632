"""The converter: round trips through our loader and mlx-lm's, the files it
writes, the quality report, and the safety of the output folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import FIXTURES, checkpoint
from granite_mlx.convert import ConvertError, OutputExistsError, QualityError, cli, convert, quality
from granite_mlx.convert.writer import PAUSE_ENV

from granite_mlx.loading import load_model

TOKENS = mx.array([[3, 17, 250, 511, 0, 42, 99, 7, 300, 128, 64, 5, 400, 12, 1, 77]])
MLX_LM_CASES = ["hybrid_nope", "moe_hybrid"]  # mlx-lm cannot build dense_rope_untied
SMALL_TENSORS = (
    "norm.weight",
    "layernorm.weight",
    "conv1d.weight",
    "conv1d.bias",
    "A_log",
    ".D",
    "dt_bias",
)


def run(src, out, **options):
    return convert(src, out, progress=False, log=lambda _: None, **options)


def logits(model):
    return model(TOKENS).astype(mx.float32)


def mlx_lm_logits(folder):
    from mlx_lm.utils import load_model as lm_load

    model, _ = lm_load(Path(folder))
    return logits(model)


def config_of(folder):
    return json.loads((Path(folder) / "config.json").read_text())


def staging_dirs(parent):
    return [p.name for p in Path(parent).iterdir() if ".partial-" in p.name or ".old-" in p.name]


def with_tokenizer(tmp_path, case="hybrid_nope"):
    """A copy of a fixture with the real tokenizer files beside it."""
    src = tmp_path / f"{case}-with-tokenizer"
    shutil.copytree(checkpoint(case), src)
    for f in (FIXTURES / "tokenizer").iterdir():
        shutil.copy(f, src / f.name)
    return src


@pytest.mark.parametrize("case", ["hybrid_nope", "dense_rope_untied", "moe_hybrid"])
def test_quantized_round_trip(tmp_path, case):
    source = logits(load_model(checkpoint(case)))
    kl = {}
    for bits in (4, 8):
        out = tmp_path / f"{case}-{bits}bit"
        result = run(checkpoint(case), out, q_bits=bits)
        kl[bits] = result.quality.mean_kl
        ours = logits(load_model(out))
        assert not mx.array_equal(ours, source)  # it really is quantized
        if case in MLX_LM_CASES:
            assert mx.allclose(mlx_lm_logits(out), ours, atol=1e-4, rtol=1e-4)
        config = config_of(out)
        assert set(config["layer_types"]) <= {"mamba", "attention"}
        q = config["quantization"]
        assert (q["bits"], q["group_size"], q["mode"]) == (bits, 64, "affine")
        assert config["quantization_config"] == q
        weights = mx.load(str(out / "model.safetensors"))
        quantized = {k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")}
        assert quantized and not any(k.endswith(SMALL_TENSORS) for k in quantized)
        assert all(w.shape[-1] == 1 for k, w in weights.items() if k.endswith("conv1d.weight"))
        report = json.loads((out / "quality.json").read_text())
        assert report["inputs"] == "random tokens" and report["mean_kl"] == kl[bits]
    assert 0 < kl[8] < kl[4]


@pytest.mark.parametrize("case", MLX_LM_CASES)
def test_transformers5_save_becomes_loadable_by_mlx_lm(tmp_path, case):
    # transformers 5 spells layer kinds linear_attention/full_attention, which mlx-lm rejects.
    src = checkpoint(case, "transformers")
    assert "linear_attention" in config_of(src)["layer_types"]
    run(src, tmp_path / "out", q_bits=8)
    assert set(config_of(tmp_path / "out")["layer_types"]) == {"mamba", "attention"}
    ours = logits(load_model(tmp_path / "out"))
    assert mx.allclose(mlx_lm_logits(tmp_path / "out"), ours, atol=1e-4, rtol=1e-4)


def test_granite_recipe_precisions(tmp_path):
    # RECIPE.md: router, the mixer projections and (with experts) the shared MLP at 8 bits.
    run(checkpoint("moe_hybrid"), tmp_path / "moe", q_bits=4)
    q = config_of(tmp_path / "moe")["quantization"]
    eight = {"group_size": 64, "bits": 8, "mode": "affine"}
    for module in ("block_sparse_moe.router.layer", "mamba.in_proj", "mamba.out_proj",
                   "shared_mlp.input_linear", "shared_mlp.output_linear"):  # fmt: skip
        assert q[f"model.layers.0.{module}"] == eight, module
    assert "model.embed_tokens" not in q and "model.layers.1.self_attn.q_proj" not in q  # 4-bit
    # intermediate_size 32: the experts' down projection falls back to group size 32
    assert q["model.layers.0.block_sparse_moe.switch_mlp.down_proj"] == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
    }
    run(checkpoint("hybrid_nope"), tmp_path / "dense_mlp", q_bits=4)
    q = config_of(tmp_path / "dense_mlp")["quantization"]
    assert "model.layers.0.mlp.gate_proj" not in q  # without experts the MLP is the bulk: 4-bit
    assert q["model.layers.0.mamba.in_proj"] == eight
    assert "model.layers.1.self_attn.q_proj" not in q  # a hybrid's few attention layers: 4-bit
    run(checkpoint("dense_rope_untied"), tmp_path / "attention_only", q_bits=4)
    q = config_of(tmp_path / "attention_only")["quantization"]
    assert q["model.layers.0.self_attn.v_proj"] == eight  # attention is the mixer here
    assert "lm_head" not in q and "model.layers.0.mlp.gate_proj" not in q
    assert q["model.layers.0.mlp.down_proj"] is False  # 48 inputs: no group size divides them


def test_uniform_and_mixed_recipes(tmp_path):
    src = checkpoint("hybrid_nope")
    uniform = run(src, tmp_path / "u", q_bits=4, recipe="uniform")
    mixed = run(src, tmp_path / "m", q_bits=4, recipe="mixed", q_group_size=32)
    assert mixed.size_bytes > uniform.size_bytes
    assert mixed.quality.mean_kl < uniform.quality.mean_kl
    q = config_of(tmp_path / "m")["quantization"]
    assert q["group_size"] == 32 and q["model.embed_tokens"]["bits"] == 8
    assert (
        q["model.layers.1.self_attn.o_proj"]["bits"] == 8 and "model.layers.0.mlp.up_proj" not in q
    )


@pytest.mark.parametrize("case", ["hybrid_nope", "dense_rope_untied", "moe_hybrid"])
def test_unquantized_conversion_is_exact(tmp_path, case):
    result = run(checkpoint(case), tmp_path / "out")
    source = logits(load_model(checkpoint(case)))
    assert mx.array_equal(logits(load_model(tmp_path / "out")), source)
    assert result.quality.mean_kl == 0 and result.quality.top1_agreement == 1
    config = config_of(tmp_path / "out")
    assert "quantization" not in config and config["torch_dtype"] == "float32"
    assert "quantized" not in (tmp_path / "out" / "README.md").read_text().split("---")[1]
    assert (tmp_path / "out").stat().st_mode & 0o055  # not left private like a mkdtemp folder
    if case in MLX_LM_CASES:
        assert mx.allclose(mlx_lm_logits(tmp_path / "out"), source, atol=1e-4, rtol=1e-4)


def test_dtype_cast_keeps_ssm_parameters_float32(tmp_path):
    run(checkpoint("hybrid_nope"), tmp_path / "out", dtype="bfloat16")
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].dtype == mx.bfloat16
    assert weights["model.layers.0.mamba.A_log"].dtype == mx.float32
    assert config_of(tmp_path / "out")["torch_dtype"] == "bfloat16"


def test_shards_and_index(tmp_path):
    out = tmp_path / "out"
    run(checkpoint("moe_hybrid"), out, q_bits=8, max_shard_bytes=60_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        assert (out / shard).stat().st_size < 60_000 + 20_000  # limit + header
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    stored = {k for s in shards for k in mx.load(str(out / s))}
    assert stored == set(index["weight_map"])
    assert mx.allclose(mlx_lm_logits(out), logits(load_model(out)), atol=1e-4, rtol=1e-4)


def test_tokenizer_template_card_and_quality_files(tmp_path):
    src = with_tokenizer(tmp_path)
    out = tmp_path / "out"
    run(src, out, q_bits=4, base_model="ibm-granite/granite-4.0-h-350m")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "generation_config.json",
        "README.md",
        "quality.json",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 100257
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: mlx" in front and "base_model: ibm-granite/granite-4.0-h-350m" in front
    assert "pip install granite-mlx" in card and "granite-mlx chat --model" in card
    assert "| mean KL |" in card
    # The real tokenizer's ids do not fit the tiny model's 512-entry vocabulary.
    report = json.loads((out / "quality.json").read_text())
    assert report["inputs"] == "random tokens" and "vocabulary has 512" in report["note"]
    from mlx_lm import load as mlx_lm_load

    from granite_mlx.tokenizer import load_tokenizer

    assert load_tokenizer(out).chat_template
    _, tokenizer = mlx_lm_load(str(out))  # mlx-lm's one-call load: model and tokenizer
    assert tokenizer.eos_token_id == 100257


def test_text_quality_report_with_the_real_vocabulary(tmp_path, monkeypatch):
    from checkpoint_factory import config_for, write_checkpoint

    # Three passages (Latin, CJK) keep this fast on a CPU: 100352 logits per token.
    monkeypatch.setattr(quality, "PASSAGES", [quality.PASSAGES[i] for i in (0, 4, 12)])
    src = write_checkpoint(tmp_path / "real_vocab", config_for("real_vocab"), seed=0)
    for f in (FIXTURES / "tokenizer").iterdir():
        shutil.copy(f, src / f.name)
    result = run(src, tmp_path / "out", q_bits=4)
    q = result.quality
    assert q.inputs == "text" and q.tokens > 100
    assert 0 < q.mean_kl < q.max_kl and 0.5 < q.ppl_ratio < 2


def kill_after_first_shard(src, out, *flags):
    """Run the CLI in a child process, SIGKILL it once it has written one shard."""
    cmd = [sys.executable, "-m", "granite_mlx.convert", str(src), str(out), "--quiet"]
    cmd += ["--skip-quality", "--max-shard-gb", "0.00006", *flags]  # several shards
    env = {**os.environ, PAUSE_ENV: "60"}  # the child sleeps after each shard
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(out.parent.glob(f".{out.name}.partial-*/model-00001-of-*.safetensors")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the conversion never wrote a shard"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion_leaves_no_finished_folder(tmp_path, existing):
    src, out = checkpoint("moe_hybrid"), tmp_path / "out"
    if existing:
        run(src, out)  # an earlier unquantized conversion, which --force is asked to replace
    kill_after_first_shard(src, out, "--q-bits", "4", "--force")
    visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
    if existing:
        assert visible == ["out"] and "quantization" not in config_of(out)  # untouched
    else:
        assert visible == []
    assert staging_dirs(tmp_path)  # hidden, and named as partial
    assert not list(tmp_path.glob(".out.partial-*/*.index.json"))  # killed before the end
    run(src, out, q_bits=4, force=True)
    assert config_of(out)["quantization"]["bits"] == 4
    assert staging_dirs(tmp_path) == []  # the killed process's staging folder is cleaned up


def test_max_kl_exceeded_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(
        [str(checkpoint("hybrid_nope")), str(out), "--q-bits", "4", "--max-kl", "1e-9", "--quiet"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and not out.exists() and staging_dirs(tmp_path) == []
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "mean KL divergence 0.0" in err and "--max-kl 1e-09" in err
    with pytest.raises(QualityError):
        run(checkpoint("hybrid_nope"), out, q_bits=4, max_kl=1e-9)


def test_existing_output_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = cli.main([str(checkpoint("hybrid_nope")), str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "--force" in err and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(OutputExistsError):
        run(checkpoint("hybrid_nope"), out)
    run(checkpoint("hybrid_nope"), out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/no/such/folder", "OUT"], "No model folder"),
        (["SRC", "OUT", "--q-bits", "3"], "--q-bits"),
        (["SRC", "OUT", "--no-quantize", "--recipe", "mixed"], "--no-quantize and --recipe contra"),
        (["SRC", "OUT", "--no-quantize", "--q-bits", "4"], "contradict"),
        (["SRC", "OUT", "--max-shard-gb", "nan"], "--max-shard-gb: must be a finite number"),
        (["SRC", "OUT", "--max-shard-gb", "inf"], "--max-shard-gb: must be a finite number"),
        (["SRC", "OUT", "--max-shard-gb", "0"], "--max-shard-gb: must be a positive finite"),
        (["SRC", "OUT", "--max-shard-gb", "big"], "--max-shard-gb: 'big' is not a number"),
        (["SRC", "OUT", "--max-kl", "nan"], "--max-kl must be a number >= 0"),
        (["SRC", "OUT", "--dry-run"], "--upload-repo"),
        (["SRC", "OUT", "--max-kl", "-1", "--q-bits", "4"], "--max-kl"),
        (["SRC", "OUT", "--upload-repo", "not a repo"], "not a Hugging Face repo name"),
        (["SRC", "SRC"], "holds the source model"),
        (["SRC"], "required"),
    ],
)
def test_user_errors_exit_1_with_one_line(tmp_path, capsys, argv, expected):
    src = str(checkpoint("hybrid_nope"))
    argv = [src if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in captured.out + err
    assert err.startswith("granite-mlx convert: error: ")
    assert not (tmp_path / "out").exists()


def test_quantized_source_is_refused(tmp_path):
    run(checkpoint("hybrid_nope"), tmp_path / "q", q_bits=4)
    with pytest.raises(ConvertError, match="already quantized"):
        run(tmp_path / "q", tmp_path / "again", q_bits=8)



# --- The 4-bit Granite recipe is the command line's default -----------------------


@pytest.mark.parametrize(
    "flags, bits, dtype",
    [
        ([], 4, None),
        (["--q-bits", "8"], 8, None),
        (["--recipe", "uniform"], 4, None),
        (["--dtype", "bfloat16", "--q-bits", "4"], 4, "bfloat16"),
        (["--dtype", "bfloat16"], None, "bfloat16"),
        (["--no-quantize"], None, "float32"),
    ],
)
def test_cli_quantizes_to_4_bits_with_the_granite_recipe_by_default(tmp_path, flags, bits, dtype):
    out = tmp_path / "out"
    argv = [str(checkpoint("hybrid_nope")), str(out), "--quiet", "--skip-quality", *flags]
    assert cli.main(argv) == 0
    config = config_of(out)
    if bits is None:
        assert "quantization" not in config and config["torch_dtype"] == dtype
        return
    q = config["quantization"]
    assert (q["bits"], q["group_size"]) == (bits, 64)
    if bits == 4 and "--recipe" not in flags:  # Granite recipe: Mamba2 projections at 8 bits
        assert q["model.layers.0.mamba.in_proj"]["bits"] == 8
    if dtype:
        assert config["torch_dtype"] == dtype


# --- Failed writes: one line, nothing left ------------------------------------------


def full_disk_after(monkeypatch, n_bytes=1000):
    """mx.save_safetensors writes `n_bytes`, then fails as MLX does on a full disk."""

    def save(path, arrays, metadata=None):
        Path(path).write_bytes(b"\0" * n_bytes)
        raise RuntimeError("[write] Unable to write 123456 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", save)


@pytest.mark.parametrize("existing", [False, True])
def test_full_disk_while_writing_shards_is_one_line_and_leaves_nothing(
    tmp_path, capsys, monkeypatch, existing
):
    src, out = checkpoint("hybrid_nope"), tmp_path / "out"
    if existing:
        run(src, out, check_quality=False)
        before = sorted(p.name for p in out.iterdir())
    full_disk_after(monkeypatch)
    argv = [str(src), str(out), "--quiet", "--skip-quality"] + (["--force"] if existing else [])
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("granite-mlx convert: error: Could not write model.safetensors")
    assert "Unable to write" in err and "ulimit -f" in err and "\n" not in err
    assert "Traceback" not in captured.out + captured.err
    assert staging_dirs(tmp_path) == []
    if existing:
        assert sorted(p.name for p in out.iterdir()) == before  # the old output, untouched
    else:
        assert not out.exists()


def test_full_disk_while_writing_a_side_file_is_a_write_error(tmp_path, monkeypatch):
    import errno

    from granite_mlx.convert import pipeline
    from granite_mlx.convert.errors import WriteError

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pipeline, "write_json", no_space)
    with pytest.raises(WriteError, match="Could not write config.json .No space left on device"):
        run(checkpoint("hybrid_nope"), tmp_path / "out", check_quality=False)
    assert list(tmp_path.iterdir()) == []


def test_file_size_limit_in_a_real_process(tmp_path):
    """RLIMIT_FSIZE (`ulimit -f`): the kernel refuses the write (EFBIG; Python ignores
    SIGXFSZ), MLX raises RuntimeError; the command says so in one line."""
    import resource

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "granite_mlx.convert", str(checkpoint("hybrid_nope")), str(out),
           "--quiet", "--skip-quality", "--no-quantize"]  # fmt: skip

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    done = subprocess.run(cmd, preexec_fn=limit, capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 1, err
    assert err.startswith("granite-mlx convert: error: Could not write") and "\n" not in err
    assert not out.exists() and staging_dirs(tmp_path) == []


# --- A crash between the two renames that publish the output ---------------------

CRASH_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path

rename = Path.rename

def rename_then_die(self, target):
    result = rename(self, target)
    if ".old-" in Path(target).name:  # OUT moved aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return result

Path.rename = rename_then_die
from granite_mlx.convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_crash_between_the_publishing_renames_never_loses_the_previous_output(tmp_path):
    src, out = checkpoint("hybrid_nope"), tmp_path / "out"
    run(src, out, check_quality=False)  # the previous output: unquantized
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    cmd = [sys.executable, "-c", CRASH_BETWEEN_RENAMES, str(src), str(out), "--quiet",
           "--skip-quality", "--q-bits", "4", "--force"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL
    assert not out.exists()  # killed between the renames: the only copy is the .old- folder
    assert any(".old-" in name for name in staging_dirs(tmp_path))

    # The next run, without --force, puts the previous output back and refuses to replace it.
    with pytest.raises(OutputExistsError):
        run(src, out, q_bits=8, check_quality=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert not any(".old-" in name for name in staging_dirs(tmp_path))
    # And with --force it is replaced, leaving nothing behind.
    run(src, out, q_bits=8, force=True, check_quality=False)
    assert config_of(out)["quantization"]["bits"] == 8 and staging_dirs(tmp_path) == []


def test_an_old_folder_beside_a_finished_output_is_cleaned_up(tmp_path):
    """Killed after the second rename: OUT is the new output, the .old- folder is stale."""
    src, out = checkpoint("hybrid_nope"), tmp_path / "out"
    run(src, out, check_quality=False)
    stale = tmp_path / ".out.old-999999999-abc"  # no such process
    shutil.copytree(out, stale)
    run(src, out, q_bits=8, force=True, check_quality=False)
    assert not stale.exists() and config_of(out)["quantization"]["bits"] == 8


# --- The model card -----------------------------------------------------------------


def card_front(out):
    return (Path(out) / "README.md").read_text().split("---")[1]


def test_card_always_has_a_license(tmp_path):
    run(checkpoint("hybrid_nope"), tmp_path / "a", check_quality=False)  # source has no card
    assert "license: apache-2.0" in card_front(tmp_path / "a")
    run(checkpoint("hybrid_nope"), tmp_path / "b", check_quality=False, license="mit")
    assert "license: mit" in card_front(tmp_path / "b")
    src = tmp_path / "src"
    shutil.copytree(checkpoint("hybrid_nope"), src)
    (src / "README.md").write_text("---\nlicense: other\n---\n# A fine-tune\n")
    run(src, tmp_path / "c", check_quality=False)
    assert "license: other" in card_front(tmp_path / "c")


@pytest.mark.parametrize("group", [32, 64, 128])
def test_card_group_size_agrees_with_its_table(tmp_path, group):
    """moe_hybrid's expert down projection (32 inputs) takes group size 32 whatever
    is asked; the card's summary line must say so, as its table does."""
    import re

    out = tmp_path / "out"
    run(checkpoint("moe_hybrid"), out, q_bits=4, q_group_size=group, check_quality=False)
    card = (out / "README.md").read_text()
    summary = card.split("with `granite-mlx convert`: ", 1)[1].split("\n", 1)[0]
    table = card.split("## Quantization", 1)[1]
    in_table = {int(g) for g in re.findall(r"-bit g(\d+)", table)}
    groups = summary.split(" recipe")[0]
    in_summary = {int(g) for g in re.findall(r"\b(\d+)\b(?!-bit| divides no)", groups)}
    assert in_table == in_summary, (summary, in_table)
