"""Run under `mlx.launch` by tests/test_parallel.py: a sharded model against the
single-process one, on every rank; each rank writes its results to OUT/rank<r>.json.

    mlx.launch -n 2 --backend ring python tests/parallel_checks.py SPEC.json OUT TOKENIZER

SPEC lists runs: {"name", "folder" (or "folders": one per rank), "mode", "checks"}.
Launching processes costs seconds, so one launch does every check of every run;
the test file asserts on the numbers. An exception ends only its own run (recorded
as "error"), as it does on every rank alike.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from granite_mlx import ChatSession, load_model, stream_generate
from granite_mlx.batch import stream_batch_generate
from granite_mlx.cache import cache_length
from granite_mlx.tokenizer import load_tokenizer


def max_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def weight_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def forward(full, sharded, ids) -> float:
    return max_diff(full(ids), sharded(ids))


def cached(full, sharded, ids, compiled: bool) -> float:
    """Prefill in chunks, then decode one token at a time: the largest logit gap."""
    worst = 0.0
    caches = []
    for model in (full, sharded):
        model.compiled_decode = compiled
        caches.append(model.make_cache())
    for start, stop in [(0, 7), (7, 20), *[(i, i + 1) for i in range(20, 26)]]:
        chunk = ids[:, start:stop]
        worst = max(worst, max_diff(full(chunk, caches[0]), sharded(chunk, caches[1])))
    full.compiled_decode = sharded.compiled_decode = True
    return worst


def tokens(responses) -> list[int]:
    return [r.token for r in responses]


def generation(full, sharded, tokenizer, prompt: list[int]) -> dict:
    greedy = [tokens(stream_generate(m, tokenizer, prompt, max_tokens=8)) for m in (full, sharded)]
    prompts = [prompt, prompt[3:11]]
    rows = []
    for model in (full, sharded):
        got = [[], []]
        for step in stream_batch_generate(model, tokenizer, prompts, max_tokens=5):
            for i, r in enumerate(step):
                if r is not None:
                    got[i].append(r.token)
        rows.append(got)
    sampled = tokens(stream_generate(sharded, tokenizer, prompt, max_tokens=8, temperature=1.0))
    return {
        "greedy_full": greedy[0], "greedy_sharded": greedy[1],
        "batch_full": rows[0], "batch_sharded": rows[1], "sampled_sharded": sampled,
    }  # fmt: skip


def session(full, sharded, tokenizer, out: Path, name: str, rank: int) -> dict:
    """A chat with a regenerate (snapshot restore), an edit and a save/load round trip."""
    result = {}
    for label, model in (("full", full), ("sharded", sharded)):
        chat = ChatSession(model, tokenizer, system="Be brief.")
        turns = [tokens(chat.send("Hello there", max_tokens=4))]
        turns.append(tokens(chat.regenerate(max_tokens=4)))
        turns.append(tokens(chat.send("And then?", max_tokens=4)))
        turns.append(tokens(chat.edit_last("Why?", max_tokens=4)))
        path = out / f"{name.replace('/', '-')}-{label}-rank{rank}.granite"
        chat.save(path)
        resumed = ChatSession.load(path, model, tokenizer)
        turns.append(tokens(resumed.send("Go on", max_tokens=4)))
        turns.append(tokens(chat.send("Go on", max_tokens=4)))
        result[label] = turns
        result[f"{label}_cache_length"] = cache_length(chat._cache)
    return result


def lockstep(full, sharded, tokenizer, rank: int) -> dict:
    """Rank 0 drives a LockstepEngine (requests joining, one aborted, one sampled with no
    seed, a prompt-cache hit in tensor mode), the others follow; rank 0 then replays the
    same calls on one single-process Engine."""
    from granite_mlx.engine import Engine, Request
    from granite_mlx.parallel import LockstepEngine, ParallelError, follow
    from granite_mlx.prompt_cache import PromptCache
    from granite_mlx.sampling import SamplingParams

    tensor = sharded.shard.mode == "tensor"

    def options():
        return {"max_batch": 4, "prompt_cache": PromptCache(2**26) if tensor else None}

    if rank != 0:
        return {"steps": follow(sharded, tokenizer, **options())}
    base = [(7 * i + 3) % 500 for i in range(20)]

    def script(seed=None) -> dict:
        sampled = SamplingParams(temperature=0.9, seed=seed)  # no seed: the engine draws one
        return {
            0: [("add", Request(prompt=base, max_tokens=6)),
                ("add", Request(prompt=base[:9], max_tokens=8, sampling=sampled))],
            10: [("add", Request(prompt=base + [11, 12], max_tokens=5))],  # base is cached by then
            3: [("abort", 1)],
        }  # fmt: skip

    result: dict = {}
    engine = LockstepEngine(sharded, tokenizer, **options())
    try:
        engine.add(Request(prompt=[1, 2], logits_processors=[lambda h, x: x]))
    except ParallelError as e:
        result["refused"] = str(e)
    runs, actions = [], script()
    for eng in (engine, Engine(full, tokenizer, **options())):
        got: dict[int, list] = {}
        steps = 0
        while steps <= max(actions) or eng.has_work:
            for action, arg in actions.get(steps, []):
                if action == "abort":
                    eng.abort(arg)
                elif eng.add(arg) == 1:  # the one-process run samples with the seed drawn here
                    seed = eng._rows[1].request.sampling.seed
            for rid, r in eng.step():
                got.setdefault(rid, []).append([r.token, r.finish_reason, r.cached_tokens])
            steps += 1
        runs.append(got)
        result.setdefault("steps", steps)
        actions = script(seed)
    engine.shutdown()
    result["sharded"], result["full"] = runs
    return result


def run(spec: dict, rank: int, out: Path, tokenizer) -> dict:
    folder = spec["folders"][rank] if "folders" in spec else spec["folder"]
    sharded = load_model(folder, dtype="float32", parallel=spec["mode"])
    full = load_model(folder, dtype="float32")
    checks = spec.get("checks", [])
    result: dict = {"shard": sharded.shard.describe()}
    result["bytes"] = [weight_bytes(sharded), weight_bytes(full)]
    vocab = full.args.vocab_size
    ids = (mx.arange(2 * 26).reshape(2, 26) * 37 + 11) % min(vocab, 500)
    if "logits" in checks or "forward" in checks:
        result["forward"] = forward(full, sharded, ids)
    if "logits" in checks:
        result["cached_compiled"] = cached(full, sharded, ids, True)
        result["cached_plain"] = cached(full, sharded, ids, False)
    if "generate" in checks:
        result.update(generation(full, sharded, tokenizer, ids[0].tolist()))
    if "lockstep" in checks:
        result["lockstep"] = lockstep(full, sharded, tokenizer, rank)
    if "session" in checks:
        result["session"] = session(full, sharded, tokenizer, out, spec["name"], rank)
    return result


def main() -> None:
    specs = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rank = mx.distributed.init().rank()
    # Loading the tokenizer costs seconds: once, and only when a check generates.
    needs = any({"generate", "session", "lockstep"} & set(spec.get("checks", [])) for spec in specs)
    tokenizer = load_tokenizer(Path(sys.argv[3])) if needs else None
    results = {}
    for spec in specs:
        start = time.perf_counter()
        try:
            results[spec["name"]] = run(spec, rank, out, tokenizer)
            results[spec["name"]]["seconds"] = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - recorded; every rank failed alike, go on
            results[spec["name"]] = {
                "error": type(e).__name__, "message": str(e), "trace": traceback.format_exc()
            }  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
