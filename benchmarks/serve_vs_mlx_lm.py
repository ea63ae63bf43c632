"""`granite-mlx serve` against `mlx_lm.server`: same weights, same machine, same requests.

One random-weight H-350M-shape checkpoint (bf16, Hub layout, the real Granite
tokenizer and chat template) is written once and served by both, each as its own
process on a loopback port, both up for the whole run and idle while the other
works. Requests go to the two servers in turn (ours, then mlx-lm, request by
request), so drift in the machine's load hits both alike. All answers are greedy.

(a) Time to first token for requests that share a prefix with earlier ones but do
    not extend them, which chat apps and agents send all the time. Per repeat, over
    a fresh 161-token system prompt (a document): a 2-turn chat is held (its first
    answer, as the client resends it, is a paragraph of --history-words words, about
    1.3 tokens a word: the length of a real answer; the random-weight model cannot
    write one, and at ~3.5 tok/s it would take minutes, so the client supplies it,
    identical for both servers), then
    - regenerate: the last request again;
    - edit: the last question replaced;
    - new chat: the same system prompt, a new first question;
    and an agent conversation (tools, a call, its result) is held, then
    - tool result: the last tool result rewritten.
(b) An append-only 6-turn chat (each turn resends the history with the server's
    own earlier answers): time to first token per turn.
(c) 8 concurrent clients, one streamed request each: aggregate generation tok/s
    (completion tokens / wall time from first send to last token) and TTFT p50/p95.

TTFT is measured at the client: from sending the request to the first streamed
event with answer text (or the end of the answer).

Sizing (CPU: ~10 tok/s prefill, ~3.5 tok/s decode for this shape): short answers
(--answer 8 tokens held in the history, 2 tokens for the timed requests), two
repeats of (a), one run of (b) and (c): 40 minutes here, on a shared machine (load 5-7).

    python benchmarks/serve_vs_mlx_lm.py [--repeats 2] [--answer 8] [--turns 6] \\
        [--clients 8] [--json out.json] [--plot out.png] [--log out.log]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx
from convert_h350m import write_source  # the same random H-350M checkpoint writer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search_orders",
            "description": "Find a customer's orders by status.",
            "parameters": {
                "type": "object",
                "properties": {"customer": {"type": "string"}, "status": {"type": "string"}},
                "required": ["customer"],
            },
        },
    }
]
WORDS = (
    "The warehouse report covers shipments, returns, staffing and the quarterly budget. "
    "Shipments rose in the north and fell in the south, returns were mostly damaged boxes, "
    "two night shifts were added, and the budget moved money from travel to equipment. "
)


def document(repeat: int) -> str:
    """A 161-token system prompt, different for each repeat (a new document)."""
    return f"Report {repeat}. Answer questions about this report only. " + WORDS * 3


class Server:
    """A server process and how to talk to it."""

    def __init__(self, name: str, command: list[str], port: int, model: str, env: dict):
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.model = model
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=self.log, env=env)
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"{name} did not start:\n{self.log.read()[-3000:]}")
            time.sleep(0.5)

    def chat(self, messages, max_tokens: int, tools=None) -> dict:
        """One streamed greedy answer: text, TTFT, usage."""
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            body["tools"] = tools
        text, first, usage = [], None, None
        start = time.perf_counter()
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=1800) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{self.name}: {r.status_code} {r.read()[:500]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"{self.name}: {event['error']}")
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    delta = choice.get("delta", {})
                    piece = delta.get("content") or ""
                    calls = delta.get("tool_calls")
                    if first is None and (piece or calls or choice.get("finish_reason")):
                        first = time.perf_counter() - start
                    text.append(piece)
        return {
            "text": "".join(text),
            "ttft": first,
            "seconds": time.perf_counter() - start,
            "usage": usage,
        }

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# --------------------------------------------------------------------------- (a)


def history_answer(words: int, repeat: int) -> str:
    """What a model might have answered to the first question: `words` words."""
    text = (
        f"In report {repeat}, the north region grew: its shipments rose while the south's "
        "fell, returns were mostly damaged boxes, two night shifts were added and the "
        "budget moved money from travel to equipment. "
    )
    out = (text * (words // len(text.split()) + 1)).split()[:words]
    return " ".join(out)


def shared_prefix(
    servers: list[Server], repeats: int, answer: int, timed: int, say, words: int = 0
) -> dict:
    results = {s.name: {} for s in servers}
    for r in range(repeats):
        system = {"role": "system", "content": document(r)}
        held: dict[str, list] = {}
        for s in servers:  # hold a 2-turn chat (each server's own answers)
            chat = [system, {"role": "user", "content": f"Which region grew, in report {r}?"}]
            a1 = s.chat(chat, answer)["text"]
            if words:
                a1 = history_answer(words, r)
            chat += [
                {"role": "assistant", "content": a1},
                {"role": "user", "content": "And what happened to the returns?"},
            ]
            s.chat(chat, answer)
            held[s.name] = chat
        edit = {"role": "user", "content": "And what about the staffing?"}
        new = {"role": "user", "content": "Summarise the budget change."}
        cases = {
            "regenerate": {n: h for n, h in held.items()},
            "edit": {n: [*h[:-1], edit] for n, h in held.items()},
            "new chat": {n: [system, new] for n in held},
        }
        for case, messages in cases.items():
            for s in servers:
                out = s.chat(messages[s.name], timed)
                results[s.name].setdefault(case, []).append(out["ttft"])
                say(
                    f"  (a) repeat {r + 1} {case:<12} {s.name:<10} TTFT {out['ttft']:7.2f} s "
                    f"(prompt {out['usage']['prompt_tokens'] if out['usage'] else '?'} tokens)"
                )
        # The agent: a call, its result; then the result rewritten.
        call = {
            "id": "call_1",
            "type": "function",
            "function": {
                "name": "search_orders",
                "arguments": json.dumps({"customer": f"ACME-{r}"}),
            },
        }
        agent = [
            system,
            {"role": "user", "content": "Find ACME's open orders."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": json.dumps({"orders": [101, 102], "status": "open"}),
            },
        ]
        rewritten = [
            *agent[:-1],
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": json.dumps({"orders": [], "status": "none found"}),
            },
        ]
        for s in servers:
            s.chat(agent, answer, tools=TOOLS)
        for s in servers:
            out = s.chat(rewritten, timed, tools=TOOLS)
            results[s.name].setdefault("tool result", []).append(out["ttft"])
            say(
                f"  (a) repeat {r + 1} {'tool result':<12} {s.name:<10} TTFT "
                f"{out['ttft']:7.2f} s (prompt {out['usage']['prompt_tokens'] if out['usage'] else '?'}"
                " tokens)"
            )
    return results


# --------------------------------------------------------------------------- (b)


QUESTIONS = [
    "What is the capital of France?",
    "How many people live there?",
    "Name a museum there.",
    "What is it known for?",
    "How do I get there by train?",
    "Is it open on Mondays?",
    "What else is nearby?",
    "Thanks, anything else?",
]


def append_only(servers: list[Server], turns: int, answer: int, say) -> dict:
    results = {s.name: [] for s in servers}
    history = {
        s.name: [{"role": "system", "content": "You are a concise travel guide."}] for s in servers
    }
    for t in range(turns):
        for s in servers:
            messages = history[s.name]
            messages.append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
            out = s.chat(messages, answer)
            messages.append({"role": "assistant", "content": out["text"]})
            results[s.name].append(out["ttft"])
            say(f"  (b) turn {t + 1} {s.name:<10} TTFT {out['ttft']:7.2f} s")
    return results


# --------------------------------------------------------------------------- (c)


def concurrent(server: Server, clients: int, answer: int, say) -> dict:
    outs: list[dict | None] = [None] * clients

    def client(i: int) -> None:
        messages = [
            {
                "role": "user",
                "content": f"Client {i}: write a short note about "
                f"{QUESTIONS[i % len(QUESTIONS)].lower()}",
            }
        ]
        outs[i] = server.chat(messages, answer)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(o["usage"]["completion_tokens"] for o in outs)
    ttfts = [o["ttft"] for o in outs]
    result = {
        "clients": clients,
        "wall_s": wall,
        "completion_tokens": tokens,
        "aggregate_tok_s": tokens / wall,
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p95": percentile(ttfts, 0.95),
        "ttfts": ttfts,
    }
    say(
        f"  (c) {server.name:<10} {clients} clients: {tokens} tokens in {wall:.1f} s = "
        f"{result['aggregate_tok_s']:.2f} tok/s, TTFT p50 {result['ttft_p50']:.1f} s, "
        f"p95 {result['ttft_p95']:.1f} s"
    )
    return result


# --------------------------------------------------------------------------- plot


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["granite-mlx", "mlx-lm"]
    colors = {"granite-mlx": "#0f62fe", "mlx-lm": "#8d8d8d"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    a = report["a"]
    cases = list(a["median_ttft"]["granite-mlx"])
    x = range(len(cases))
    for k, name in enumerate(names):
        axes[0].bar(
            [i + (k - 0.5) * 0.4 for i in x],
            [a["median_ttft"][name][c] for c in cases],
            0.4,
            label=name,
            color=colors[name],
        )
    axes[0].set_xticks(list(x), cases, rotation=15)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("time to first token (s, log)")
    axes[0].set_title(f"(a) shared prefixes: {a['geomean_speedup']:.1f}x lower (geomean)")
    axes[0].legend()
    b = report["b"]
    for name in names:
        axes[1].plot(range(1, len(b[name]) + 1), b[name], "o-", label=name, color=colors[name])
    axes[1].set_xlabel("turn")
    axes[1].set_ylabel("time to first token (s)")
    axes[1].set_title("(b) append-only chat")
    axes[1].legend()
    c = report["c"]
    labels = ["aggregate tok/s", "TTFT p50 (s)", "TTFT p95 (s)"]
    keys = ["aggregate_tok_s", "ttft_p50", "ttft_p95"]
    for k, name in enumerate(names):
        axes[2].bar(
            [i + (k - 0.5) * 0.4 for i in range(3)],
            [c[name][key] for key in keys],
            0.4,
            label=name,
            color=colors[name],
        )
    axes[2].set_xticks(range(3), labels)
    axes[2].set_title(f"(c) {c['granite-mlx']['clients']} concurrent clients")
    axes[2].legend()
    fig.suptitle(report["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--answer", type=int, default=8, help="tokens per answer held in history")
    ap.add_argument(
        "--history-words", type=int, default=100,
        help="(a): the held chat's first answer, as resent by the client (0: the server's own "
        "--answer tokens)",
    )  # fmt: skip
    ap.add_argument("--timed", type=int, default=2, help="max_tokens of the timed requests")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--concurrent-answer", type=int, default=24)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--log", default=None)
    a = ap.parse_args()

    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    work = Path(tempfile.mkdtemp(prefix="serve-vs-mlx-lm-"))
    servers: list[Server] = []
    try:
        folder = work / "granite-h350m-random"
        write_source(folder)
        hf_home = work / "hf"
        (hf_home / "hub").mkdir(parents=True)  # mlx_lm.server's /v1/models needs it
        env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
        ours_port, theirs_port = free_port(), free_port()
        servers.append(
            Server(
                "granite-mlx",
                [
                    sys.executable,
                    "-m",
                    "granite_mlx.serve",
                    "--model",
                    str(folder),
                    "--port",
                    str(ours_port),
                    "--max-batch",
                    str(a.clients),
                ],
                ours_port,
                folder.name,
                env,
            )
        )
        servers.append(
            Server(
                "mlx-lm",
                [
                    sys.executable,
                    "-m",
                    "mlx_lm",
                    "server",
                    "--model",
                    str(folder),
                    "--port",
                    str(theirs_port),
                    "--temp",
                    "0",
                    "--decode-concurrency",
                    str(a.clients),
                    "--log-level",
                    "WARNING",
                ],
                theirs_port,
                "default_model",
                env,
            )
        )
        title = (
            f"H-350M shape, random bf16 weights, real tokenizer; {platform.machine()}, "
            f"mlx {mx.__version__}, {mx.default_device()}"
        )
        say(title)
        for s in servers:  # warm up (kernels, tokenizer)
            s.chat([{"role": "user", "content": "Hi"}], 2)

        say("(a) time to first token, requests sharing a prefix without extending it")
        a_raw = shared_prefix(servers, a.repeats, a.answer, a.timed, say, a.history_words)
        med = {n: {c: statistics.median(v) for c, v in cases.items()} for n, cases in a_raw.items()}
        speedups = {c: med["mlx-lm"][c] / med["granite-mlx"][c] for c in med["granite-mlx"]}
        gm = geomean(list(speedups.values()))
        say(
            "  median TTFT (s)   "
            + "  ".join(
                f"{c}: {med['granite-mlx'][c]:.2f} vs {med['mlx-lm'][c]:.2f} ({speedups[c]:.1f}x)"
                for c in speedups
            )
        )
        say(
            f"  geometric mean speed-up: {gm:.1f}x; slower anywhere: "
            f"{any(v < 1 for v in speedups.values())}"
        )

        say(f"(b) append-only {a.turns}-turn chat, time to first token per turn")
        b = append_only(servers, a.turns, a.answer, say)
        for name in b:
            say(f"  {name:<11} " + " ".join(f"{t:6.2f}" for t in b[name]))

        say(f"(c) {a.clients} concurrent clients, {a.concurrent_answer}-token answers")
        c = {s.name: concurrent(s, a.clients, a.concurrent_answer, say) for s in servers}

        report = {
            "title": title,
            "settings": vars(a),
            "a": {"ttft": a_raw, "median_ttft": med, "speedup": speedups, "geomean_speedup": gm},
            "b": b,
            "c": c,
        }
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        if a.plot:
            plot(report, a.plot)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
        if a.log:
            Path(a.log).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
