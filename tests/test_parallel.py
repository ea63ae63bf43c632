"""Granite across several processes (granite_mlx.parallel), on MLX's ring backend over
loopback, started the way users start it: `mlx.launch -n 2 --backend ring ...`.

Launching costs seconds, so one `mlx.launch -n 2` runs every library check at once
(tests/parallel_checks.py writes each rank's results) and the tests here read them:
logits equal to the single-process model (float32, 1e-5) for the hybrid, dense,
MoE and two-group checkpoints and for quantized layouts, in pipeline and tensor mode,
prefill and compiled or plain decode; greedy and batched generation identical;
sampling identical on every rank (the shared seed); chat sessions with snapshot
restore, edit and save/load identical; weights per rank about 1/N; clear errors for
a split that cannot be made and for ranks that disagree. A second launch does the
same on 4 ranks, one more runs the CLI, and two start the ranks by hand (as
mlx.launch does) to kill or freeze one of them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoint_factory import config_for, write_checkpoint
from conftest import FIXTURES, REFERENCE, checkpoint

from granite_mlx import cli, generate, load
from granite_mlx.config import ModelArgs
from granite_mlx.parallel import (
    SplitError,
    _pipeline_stages,
    _TensorPlan,
    plan_stages,
    rank_weight_bytes,
)
from granite_mlx.shapes import shape_config

TOKENIZER = FIXTURES / "tokenizer"
CHECKS = Path(__file__).parent / "parallel_checks.py"
CASES = ["hybrid_nope", "dense_rope_untied", "moe_hybrid", "groups2"]
MODES = ["pipeline", "tensor"]
TOLERANCE = 1e-5


def mlx_launch() -> str:
    found = shutil.which("mlx.launch")
    return found or str(Path(sys.base_prefix) / "bin" / "mlx.launch")


def free_ports(count: int) -> int:
    """A base port with `count` free ports after it (the ring listens on base + rank)."""
    for base in range(41000, 60000, 97):
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def launch(n: int, command: list[str], timeout: float) -> subprocess.CompletedProcess:
    argv = [mlx_launch(), "-n", str(n), "--backend", "ring", "-p", str(free_ports(n)), *command]
    return subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def with_tokenizer(folder: Path) -> Path:
    for f in TOKENIZER.iterdir():
        if not (folder / f.name).exists():
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The checkpoints the launched checks load, each with the real tokenizer."""
    from granite_mlx.convert.pipeline import convert

    base = tmp_path_factory.mktemp("parallel")
    out = {
        case: with_tokenizer(Path(shutil.copytree(checkpoint(case), base / case))) for case in CASES
    }
    ref = json.loads((REFERENCE / "generation.json").read_text())["real_vocab"]
    write_checkpoint(base / "real_vocab", dict(ref["config"]), ref["seed"])
    out["real_vocab"] = with_tokenizer(base / "real_vocab")
    # Our converter's output (Granite recipe: 4 and 8 bits per module), of a shape whose
    # column cuts fall on 32-wide quantization groups when split 2 ways.
    write_checkpoint(base / "wide", config_for("hybrid_nope") | {"shared_intermediate_size": 64}, 7)
    convert(base / "wide", base / "q_ours", q_bits=4, q_group_size=32, check_quality=False,
            progress=False, log=lambda *_: None)  # fmt: skip
    out["q_ours"] = base / "q_ours"
    out["q_mlx_lm"] = mlx_community_layout(checkpoint("moe_hybrid"), base / "q_mlx_lm")
    # The same config.json as hybrid_nope, other weights: ranks that would disagree.
    config = json.loads((checkpoint("hybrid_nope") / "config.json").read_text())
    write_checkpoint(base / "reseeded", config, 99)
    out["reseeded"] = base / "reseeded"
    # 510 rows do not split 4 ways evenly: the last rank's head rows are fewer.
    write_checkpoint(base / "odd_vocab", config_for("hybrid_nope") | {"vocab_size": 510}, 3)
    out["odd_vocab"] = base / "odd_vocab"
    return out


def mlx_community_layout(src: Path, dst: Path) -> Path:
    """A 4-bit checkpoint in mlx-lm's layout, written by mlx-lm itself."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(src, model_config={"time_step_limit": [0.0, float("inf")]})
    model, config = quantize_model(model, config, 32, 4)
    dst.mkdir()
    save_model(dst, model)
    save_config(config, dst / "config.json")
    return dst


def run_checks(folders: dict[str, Path], n: int, specs: list[dict], out: Path) -> list[dict]:
    """Launch parallel_checks.py on n ranks; every rank's results."""
    spec_file = out / "spec.json"
    spec_file.write_text(json.dumps(specs))
    done = launch(n, [sys.executable, str(CHECKS), str(spec_file), str(out), str(TOKENIZER)], 600)
    ranks = []
    for r in range(n):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no results:\n{done.stdout}\n{done.stderr}"
        ranks.append(json.loads(path.read_text()))
    return ranks


def spec(name: str, folder: Path, mode: str, *checks: str) -> dict:
    return {"name": name, "folder": str(folder), "mode": mode, "checks": list(checks)}


@pytest.fixture(scope="module")
def two_ranks(folders, tmp_path_factory) -> list[dict]:
    specs = []
    for mode in MODES:
        specs.append(spec(f"hybrid_nope/{mode}", folders["hybrid_nope"], mode, "logits", "generate",
                          "lockstep"))  # fmt: skip
        for case in CASES[1:]:
            specs.append(spec(f"{case}/{mode}", folders[case], mode, "logits"))
        specs.append(spec(f"real_vocab/{mode}", folders["real_vocab"], mode, "session"))
        specs.append(spec(f"q_ours/{mode}", folders["q_ours"], mode, "logits"))
        specs.append(spec(f"q_mlx_lm/{mode}", folders["q_mlx_lm"], mode, "logits"))
    for other in ["groups2", "reseeded"]:  # another config, other weights
        disagree = spec(f"disagree/{other}", folders["hybrid_nope"], "tensor", "logits")
        disagree["folders"] = [str(folders["hybrid_nope"]), str(folders[other])]
        specs.append(disagree)
    return run_checks(folders, 2, specs, tmp_path_factory.mktemp("two_ranks"))


def result(ranks: list[dict], name: str) -> list[dict]:
    for r, results in enumerate(ranks):
        got = results[name]
        assert "error" not in got, f"rank {r}, {name}: {got.get('trace')}"
    return [results[name] for results in ranks]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [*CASES, "q_ours"])
def test_logits_equal_the_single_process_model(two_ranks, case, mode):
    for r in result(two_ranks, f"{case}/{mode}"):
        assert r["forward"] <= TOLERANCE
        assert r["cached_compiled"] <= TOLERANCE  # prefill chunks, then the compiled decode step
        assert r["cached_plain"] <= TOLERANCE


def test_mlx_community_quantized_layout_splits_in_pipeline_mode(two_ranks):
    for r in result(two_ranks, "q_mlx_lm/pipeline"):
        assert r["forward"] <= TOLERANCE and r["cached_compiled"] <= TOLERANCE


def test_a_split_across_quantization_groups_is_refused_clearly(two_ranks):
    # The experts' 32 intermediate columns, 4-bit in groups of 32, cannot be cut in two.
    for r in two_ranks:
        got = r["q_mlx_lm/tensor"]
        assert got["error"] == "SplitError"
        assert got["message"].startswith("Cannot split this model 2 ways")
        assert "quantization group" in got["message"] and "parallel='pipeline'" in got["message"]


def test_ranks_that_disagree_on_the_model_stop_with_a_message(two_ranks):
    for r in two_ranks:
        for other, what in [("groups2", "config.json or parallel mode"), ("reseeded", "weights")]:
            got = r[f"disagree/{other}"]
            assert got["error"] == "SplitError"
            assert (
                f"The ranks disagree on the model: rank 1's {what} differ from rank 0's"
                in got["message"]
            )


@pytest.mark.parametrize("mode", MODES)
def test_greedy_and_batched_generation_are_identical(two_ranks, mode):
    ranks = result(two_ranks, f"hybrid_nope/{mode}")
    for r in ranks:
        assert r["greedy_sharded"] == r["greedy_full"] and len(r["greedy_full"]) == 8
        assert r["batch_sharded"] == r["batch_full"]
    # Sampling with no seed given: rank 0's seed was shared, so every rank drew alike.
    assert ranks[0]["sampled_sharded"] == ranks[1]["sampled_sharded"]


@pytest.mark.parametrize("mode", MODES)
def test_the_engine_in_lockstep_answers_as_one_process_does(two_ranks, mode):
    ranks = result(two_ranks, f"hybrid_nope/{mode}")
    lead = ranks[0]["lockstep"]
    assert lead["sharded"] == lead["full"]  # every request's tokens, finish reasons, cache hits
    assert sorted(lead["full"]) == ["0", "1", "2"]
    assert lead["full"]["1"][-1][1] == "cancelled"
    if mode == "tensor":  # its prompt cache served the third request's shared prefix
        assert lead["full"]["2"][0][2] > 0
    assert ranks[1]["lockstep"]["steps"] == lead["steps"]  # the follower stepped alike
    assert "no logits_processors, constraint or cache" in lead["refused"]


def test_a_prompt_cache_is_refused_across_pipeline_stages():
    from granite_mlx.parallel import ParallelError, Shard, _check_engine_options

    class Stage:
        shard = Shard("pipeline", 0, 2, (0, 2), (0, 256))

    with pytest.raises(ParallelError, match="differ between pipeline stages"):
        _check_engine_options(Stage(), {"prompt_cache": object()})


@pytest.mark.parametrize("mode", MODES)
def test_chat_session_snapshots_and_saved_sessions_are_identical(two_ranks, mode):
    for r in result(two_ranks, f"real_vocab/{mode}"):
        session = r["session"]
        # send, regenerate (restores a snapshot), send, edit_last, resume from a file, go on
        assert session["sharded"] == session["full"]
        assert session["sharded"][0] == session["sharded"][1]
        assert session["sharded"][4] == session["sharded"][5]
        assert session["sharded_cache_length"] == session["full_cache_length"]


def test_each_rank_holds_only_its_part_of_the_weights(two_ranks):
    for name in [f"{case}/{mode}" for case in CASES for mode in MODES]:
        ranks = result(two_ranks, name)
        full = ranks[0]["bytes"][1]
        held = [r["bytes"][0] for r in ranks]
        # These 4-layer models are mostly embedding and K/V (which pipeline stages are
        # balanced by too); the shares of the released shapes are checked below.
        assert max(held) <= (0.6 if name.endswith("tensor") else 0.7) * full, (name, held, full)
        assert sum(held) <= 1.2 * full, (name, held, full)


@pytest.mark.parametrize("shape", ["h-small", "h-tiny"])
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("mode", MODES)
def test_released_shapes_split_into_about_one_nth_per_rank(shape, bits, mode):
    args = ModelArgs.from_dict(shape_config(shape))
    whole = rank_weight_bytes(args, mode, 1, bits=bits)[0]
    for n in (2, 4):
        shares = [b / whole for b in rank_weight_bytes(args, mode, n, bits=bits)]
        assert max(shares) <= 1 / n + 0.02, shares


def test_four_ranks(folders, tmp_path_factory):
    # Tensor: 2 K/V heads for 4 ranks (each kept by two), 2 Mamba2 groups each spread
    # over two ranks (their norm adds up squares across them). Pipeline: one layer per
    # stage, and 510 head rows, which do not split 4 ways evenly. Four processes on
    # this 2-core machine are slow: one forward pass each.
    specs = [
        spec("groups2/tensor", folders["groups2"], "tensor", "forward"),
        spec("odd_vocab/pipeline", folders["odd_vocab"], "pipeline", "forward"),
    ]
    ranks = run_checks(folders, 4, specs, tmp_path_factory.mktemp("four_ranks"))
    for name, share in [("groups2/tensor", 0.35), ("odd_vocab/pipeline", 0.5)]:
        got = result(ranks, name)
        assert all(r["forward"] <= TOLERANCE for r in got)
        assert [r["shard"].split(":")[0] for r in got] == [
            f"{name.split('/')[1]} rank {i} of 4" for i in range(4)
        ]
        assert max(r["bytes"][0] for r in got) <= share * got[0]["bytes"][1], name


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


def generate_argv(folder: Path, *extra: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "granite-mlx"), "generate", "--model", str(folder),
        "--raw", "--prompt", "ab", "--dtype", "float32", *extra,
    ]  # fmt: skip


def test_cli_generate_under_mlx_launch_prints_once(folders):
    model, tokenizer = load(folders["hybrid_nope"], dtype="float32")
    alone = generate(model, tokenizer, "ab", max_tokens=12)
    argv = generate_argv(folders["hybrid_nope"], "--max-tokens", "12", "--parallel", "pipeline")
    done = launch(2, argv, 300)
    assert done.stdout == alone + "\n"  # rank 0 alone writes, the same answer
    assert done.stderr.count("prompt:") == 1 and "finish: length" in done.stderr


def test_cli_refuses_mlx_launch_misuse(capsys, monkeypatch, folders):
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", "/nonexistent")
    assert cli.main(generate_argv(folders["hybrid_nope"])[1:]) == 1
    assert "pass --parallel pipeline or --parallel tensor" in capsys.readouterr().err
    argv = generate_argv(folders["hybrid_nope"], "--parallel", "tensor")[1:]
    argv[argv.index("ab")] = "-"
    assert cli.main(argv) == 1
    assert '--prompt "$(cat FILE)"' in capsys.readouterr().err


def test_cli_errors_every_rank_meets_are_reported_by_rank_0_alone(capsys, monkeypatch, folders):
    monkeypatch.setattr(cli._Rank, "number", 1)
    monkeypatch.setattr(cli._Rank, "comm", None)
    argv = generate_argv(folders["hybrid_nope"], "--top-p", "2")[1:]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == ""  # rank 0 says it
    # Its own problem (here: no model folder), a rank reports itself, naming its rank.
    assert cli.main(generate_argv(Path("/nonexistent"))[1:]) == 1
    assert capsys.readouterr().err.startswith("granite-mlx: error: rank 1: No model folder at")


def start_ranks(tmp_path: Path, argv: list[str]) -> list[subprocess.Popen]:
    """Two ranks started as mlx.launch starts them (hostfile + rank), without the launcher,
    which would stop the survivor itself as soon as one rank dies."""
    base = free_ports(2)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
    procs = []
    for rank in range(2):
        env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)}
        out = open(tmp_path / f"out{rank}.txt", "w")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while (tmp_path / "out0.txt").stat().st_size == 0:  # generating
        assert time.monotonic() < deadline and procs[0].poll() is None
        time.sleep(0.2)
    return procs


@pytest.mark.parametrize(
    "mode, stop, message",
    [
        ("pipeline", signal.SIGKILL, "rank 0 lost the connection to another rank ([ring]"),
        ("tensor", signal.SIGSTOP, "rank 0: no progress for"),  # frozen: the watchdog
    ],
    ids=["killed", "frozen"],
)
def test_a_rank_that_dies_or_freezes_stops_the_others_with_a_message(
    folders, tmp_path, mode, stop, message
):
    argv = generate_argv(folders["hybrid_nope"], "--max-tokens", "100000", "--parallel", mode,
                         "--peer-timeout", "3")  # fmt: skip
    procs = start_ranks(tmp_path, argv)
    try:
        procs[1].send_signal(stop)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode == 1
        assert time.monotonic() - start < 30
        assert message in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------
# Plans, without launching
# --------------------------------------------------------------------------


def test_stages_balance_bytes_and_are_contiguous():
    costs = [10, 10, 10, 10, 40, 10, 10, 10]
    assert plan_stages(costs, [0, 0]) == [(0, 4), (4, 8)]  # 40 | 70 against 80 | 30
    assert plan_stages(costs, [50, 0]) == [(0, 3), (3, 8)]  # rank 0's embedding counts
    stages = plan_stages([1] * 8, [0] * 4)
    assert stages == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_splits_that_cannot_be_made_say_why():
    wide = config_for("hybrid_nope") | {
        "hidden_size": 96, "num_attention_heads": 12, "num_key_value_heads": 4,
        "mamba_n_heads": 12, "mamba_d_head": 16,
    }  # fmt: skip
    cases = [
        (config_for("hybrid_nope"), 3, "num_attention_heads is 4, not a multiple of 3"),
        (wide, 3, "num_key_value_heads is 4: neither a multiple nor a divisor of 3"),
        (config_for("groups2") | {"mamba_n_groups": 4}, 8, "num_attention_heads is 4"),
    ]
    for config, size, words in cases:
        with pytest.raises(SplitError, match=f"Cannot split this model {size} ways: {words}"):
            _TensorPlan(ModelArgs.from_dict(config), 0, size)
    args = ModelArgs.from_dict(config_for("hybrid_nope"))
    with pytest.raises(SplitError, match="it has 4 layers, fewer than the ranks"):
        _pipeline_stages(args, {}, 8, 2)


def test_serve_under_mlx_launch_answers_as_one_process(folders, mode="tensor"):
    """`mlx.launch -n 2 granite-mlx serve --parallel ...`: rank 0 serves HTTP, rank 1
    follows; answers (and a prompt-cache hit, in tensor mode) as one process gives them;
    an idle gap longer than the peer timeout is survived (heartbeat); SIGTERM stops all."""
    import httpx
    from openai import OpenAI

    folder = folders["real_vocab"]
    model, tokenizer = load(folder, dtype="float32")
    messages = [{"role": "user", "content": "Hello there"}]
    alone = generate(model, tokenizer, messages, max_tokens=6)
    port = free_ports(1)
    argv = [mlx_launch(), "-n", "2", "--backend", "ring", "-p", str(free_ports(2) + 500),
            str(Path(sys.executable).parent / "granite-mlx"), "serve", "--model", str(folder),
            "--dtype", "float32", "--parallel", mode, "--port", str(port), "--max-batch", "2",
            "--peer-timeout", "4"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.3)
        client = OpenAI(base_url=url + "/v1", api_key="none")
        for turn in range(2):
            reply = client.chat.completions.create(
                model="real_vocab", messages=messages, max_tokens=6, temperature=0
            )
            assert reply.choices[0].message.content == alone
            assert reply.usage.completion_tokens == 6
            cached = reply.usage.prompt_tokens_details.cached_tokens
            if turn == 1 and mode == "tensor":
                assert cached > 0
            time.sleep(6)  # idle past --peer-timeout: the heartbeat keeps the ranks alive
        assert proc.poll() is None
        # SIGTERM to rank 0 (as a service manager stops it): it ends the server and lets
        # the other rank go; every process, the launcher too, exits cleanly.
        os.kill(rank_pid(proc.pid, 0), signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, out
    assert out.count("Serving") == 1 and "Stopped." in out  # rank 0 alone speaks


def rank_pid(session: int, rank: int) -> int:
    """The pid of one rank that mlx.launch started (in the launcher's session)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == session:
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if f"MLX_RANK={rank}".encode() in env and b"serve" in (entry / "cmdline").read_bytes():
            return int(entry.name)
    raise AssertionError(f"no rank {rank} process")
