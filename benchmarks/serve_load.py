"""Load test of `granite-mlx serve`: many clients, mixed requests, some hanging up.

32 client threads send 200 requests (loopback only) to a `granite-mlx serve`
subprocess: OpenAI chat (streamed and not), OpenAI completions and Ollama chat,
with answers of 4 to 96 tokens, over prompts that share system prompts and
conversation prefixes (so the prompt cache is hit, missed and evicted), and one
streamed request in seven hangs up after a few chunks. Checked:

* every answer that was not hung up is complete and exactly the library's own
  greedy answer (`granite_mlx.complete` on a separate copy of the model);
* no request is lost: each gets its answer, or an error it can see;
* afterwards the engine is idle and MLX's active memory is back to its baseline,
  plus what the prompt cache holds (bounded by --prompt-cache-gb); a second,
  identical round must not grow it further.

The model is the test-suite's tiny one with the real Granite vocabulary and
tokenizer (random weights), so the run takes minutes on a laptop CPU: this tests
the server under load, not the speed of a model (see serve_vs_mlx_lm.py for that).

    python benchmarks/serve_load.py [--clients 32] [--requests 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx

from granite_mlx import complete, load

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from checkpoint_factory import config_for, write_checkpoint  # noqa: E402 (a tests/ helper)

TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"
EOS = 100257
SYSTEMS = [
    "You are a helpful assistant for a hardware store. " * 4,
    "You translate English into French. Keep the register. " * 3,
    "You are a terse assistant.",
]
TOPICS = ["hammers", "paint", "ladders", "garden hoses", "drills", "screws", "glue", "tiles"]


def make_specs(n: int, seed: int) -> list[dict]:
    """The requests: kind, messages or prompt, answer length, whether to hang up."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        system = rng.choice(SYSTEMS)
        turns = rng.randint(1, 3)
        messages = [{"role": "system", "content": system}]
        for t in range(turns):
            messages.append({"role": "user", "content": f"Tell me about {rng.choice(TOPICS)}."})
            if t < turns - 1:
                messages.append({"role": "assistant", "content": f"Sure: {TOPICS[t]} are useful."})
        kind = rng.choice(["chat", "chat_stream", "chat_stream", "completion", "ollama"])
        spec = {
            "id": i,
            "kind": kind,
            "messages": messages,
            "max_tokens": rng.choice([4, 8, 16, 32, 64, 96]),
            "hang_up": kind == "chat_stream" and rng.random() < 2 / 7,
        }
        if kind == "completion":
            spec["prompt"] = f"{system} Question {i}: what about {rng.choice(TOPICS)}? Answer:"
        specs.append(spec)
    return specs


def reference(model, tokenizer, spec: dict) -> str:
    prompt = spec.get("prompt", spec["messages"])
    return complete(model, tokenizer, prompt, max_tokens=spec["max_tokens"]).text


def run_one(url: str, name: str, spec: dict) -> dict:
    """Send one request; returns {"status", "text" | "error", "hung_up"}."""
    n = spec["max_tokens"]
    with httpx.Client(base_url=url, timeout=600) as http:
        if spec["kind"] == "chat":
            r = http.post(
                "/v1/chat/completions",
                json={
                    "model": name,
                    "messages": spec["messages"],
                    "max_tokens": n,
                    "temperature": 0,
                },
            )
            body = r.json()
            if r.status_code != 200:
                return {"status": r.status_code, "error": body}
            return {
                "status": 200,
                "text": body["choices"][0]["message"]["content"] or "",
                "finish": body["choices"][0]["finish_reason"],
            }
        if spec["kind"] == "completion":
            r = http.post(
                "/v1/completions",
                json={"model": name, "prompt": spec["prompt"], "max_tokens": n, "temperature": 0},
            )
            body = r.json()
            if r.status_code != 200:
                return {"status": r.status_code, "error": body}
            return {
                "status": 200,
                "text": body["choices"][0]["text"],
                "finish": body["choices"][0]["finish_reason"],
            }
        if spec["kind"] == "ollama":
            r = http.post(
                "/api/chat",
                json={
                    "model": name,
                    "messages": spec["messages"],
                    "stream": False,
                    "options": {"temperature": 0, "num_predict": n},
                },
            )
            body = r.json()
            if r.status_code != 200:
                return {"status": r.status_code, "error": body}
            return {
                "status": 200,
                "text": body["message"]["content"],
                "finish": body["done_reason"],
            }
        # Streamed chat, possibly hung up after a few chunks.
        body = {
            "model": name,
            "messages": spec["messages"],
            "max_tokens": n,
            "temperature": 0,
            "stream": True,
        }
        text, finish = [], None
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"status": r.status_code, "error": r.read().decode()}
            for k, line in enumerate(r.iter_lines()):
                if spec["hang_up"] and k >= 3:
                    return {"status": 200, "hung_up": True}
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"status": 200, "error": event["error"]}
                for choice in event["choices"]:
                    text.append(choice["delta"].get("content") or "")
                    finish = choice["finish_reason"] or finish
        return {"status": 200, "text": "".join(text), "finish": finish}


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


def settle(url: str, timeout: float = 60) -> dict:
    """Wait until the engine is idle; its /health then."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(url)
        if h["requests"] == {"running": 0, "waiting": 0, "open": 0}:
            return h
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine did not go idle: {h['requests']}")
        time.sleep(0.2)


def rss_mb(pid: int) -> float:
    out = subprocess.run(
        ["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip()) / 1024


def load_round(url: str, name: str, specs: list[dict], clients: int) -> tuple[list, float]:
    results: list[dict | None] = [None] * len(specs)
    todo = list(range(len(specs)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            try:
                results[i] = run_one(url, name, specs[i])
            except Exception as exc:  # noqa: BLE001 - a lost request is what we count
                results[i] = {"status": "exception", "error": repr(exc)}

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-cache-gb", type=float, default=0.004)  # small: evictions happen
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default=None, help="also write the report here")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    folder = write_checkpoint(work / "granite-tiny", config_for("real_vocab"), seed=0)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, folder / f.name)
    specs = make_specs(a.requests, a.seed)

    model, tokenizer = load(folder, dtype="float32")
    t0 = time.perf_counter()
    expected = [reference(model, tokenizer, s) for s in specs]
    ref_seconds = time.perf_counter() - t0

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "granite_mlx.serve",
            "--model",
            str(folder),
            "--port",
            "0",
            "--dtype",
            "float32",
            "--max-batch",
            "8",
            "--max-queue",
            "64",
            "--prompt-cache-gb",
            str(a.prompt_cache_gb),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    try:
        url = re.search(r"at (http://\S+)", server.stdout.readline()).group(1)
        name = folder.name
        run_one(url, name, {**specs[0], "kind": "chat", "hang_up": False})  # warm up
        base = settle(url)
        report = {
            "machine": f"{platform.machine()}, mlx {mx.__version__}, {mx.default_device()}",
            "clients": a.clients,
            "requests": a.requests,
            "reference_seconds": ref_seconds,
            "baseline": {"active_gb": base["memory_gb"]["active"], "rss_mb": rss_mb(server.pid)},
            "rounds": [],
        }
        ok = True
        for round_ in range(a.rounds):
            results, seconds = load_round(url, name, specs, a.clients)
            after = settle(url)
            hung = sum(1 for r in results if r and r.get("hung_up"))
            answered = [i for i, r in enumerate(results) if r and "text" in r]
            exact = [i for i in answered if results[i]["text"] == expected[i]]
            lost = [i for i, r in enumerate(results) if r is None or "error" in r]
            cache = after.get("prompt_cache", {})
            grown = after["memory_gb"]["active"] - base["memory_gb"]["active"]
            entry = {
                "round": round_ + 1,
                "seconds": round(seconds, 1),
                "answered": len(answered),
                "exact": len(exact),
                "hung_up": hung,
                "lost_or_failed": len(lost),
                "failures": [results[i] for i in lost][:5],
                "mismatches": [
                    {"id": i, "got": results[i]["text"], "want": expected[i]}
                    for i in answered
                    if i not in set(exact)
                ][:5],
                "active_gb_after": after["memory_gb"]["active"],
                "active_growth_gb": round(grown, 4),
                "prompt_cache_gb": round(cache.get("bytes", 0) / 1e9, 4),
                "prompt_cache": cache,
                "rss_mb_after": rss_mb(server.pid),
            }
            report["rounds"].append(entry)
            # Memory: back to the baseline, plus the prompt cache's own bytes (10% + 1 MB slack).
            memory_ok = grown <= cache.get("bytes", 0) / 1e9 * 1.1 + 0.001
            ok &= len(exact) == len(answered) == a.requests - hung and not lost and memory_ok
            lines.append(
                f"round {round_ + 1}: {a.requests} requests from {a.clients} clients in "
                f"{seconds:.1f} s: {len(answered)} answered, {len(exact)} exactly the library's, "
                f"{hung} hung up on purpose, {len(lost)} lost or failed; MLX active memory "
                f"{base['memory_gb']['active']:.4f} GB before, {after['memory_gb']['active']:.4f}"
                f" GB after (prompt cache {cache.get('bytes', 0) / 1e9:.4f} GB, "
                f"{cache.get('hits', 0)} hits, {cache.get('evictions', 0)} evictions); "
                f"server RSS {entry['rss_mb_after']:.0f} MB"
            )
        report["ok"] = bool(ok)
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    head = [
        f"machine: {report['machine']}",
        (
            "granite-mlx serve, tiny real-vocabulary model (float32), --max-batch 8 "
            f"--max-queue 64 --prompt-cache-gb {a.prompt_cache_gb}; "
            f"references computed in {ref_seconds:.1f} s"
        ),
        (
            f"baseline after warm-up: MLX active {report['baseline']['active_gb']:.4f} GB, "
            f"RSS {report['baseline']['rss_mb']:.0f} MB"
        ),
    ]
    text = "\n".join([*head, *lines, f"result: {'PASS' if report['ok'] else 'FAIL'}"])
    print(text)
    if a.log:
        Path(a.log).write_text(text + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
