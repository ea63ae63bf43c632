"""Time to first token of turn 10 of a chat: ChatSession cache reuse vs re-prefilling.

A random-weight H-350M (bf16) with the real Granite tokenizer and chat template
holds a 9-turn conversation (greedy answers of --answer tokens). Turn 10 is then
answered twice over the same messages:

* session: the ChatSession that held the conversation (restored from a saved
  copy before each repeat, outside the timing) prefills only what is new;
* re-prefill: a fresh cache prefills the whole conversation.

    python benchmarks/session_ttft.py [--turns 10] [--answer 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from granite_mlx import ChatSession, stream_generate
from granite_mlx.chat_format import encode_prompt
from granite_mlx.shapes import random_model
from granite_mlx.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizer"
QUESTIONS = [
    "What is the capital of France?",
    "How many people live there, roughly?",
    "Name three museums in that city and say what each is known for.",
    "Which of them would you visit first, and why?",
    "What is the best way to get there from the airport?",
    "How long does that take at rush hour?",
    "Suggest a restaurant nearby for a quick lunch.",
    "Is it usually busy on a weekday?",
    "What should I see in the evening?",
    "Summarise the plan for the whole day in three bullet points.",
]


def first_token_seconds(responses) -> float:
    """Seconds until the stream yields its first response (then drain it)."""
    start = time.perf_counter()
    next(responses)
    elapsed = time.perf_counter() - start
    for _ in responses:
        pass
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="h-350m")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--answer", type=int, default=16, help="tokens per earlier answer")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    questions = (QUESTIONS * (a.turns // len(QUESTIONS) + 1))[: a.turns]

    model = random_model(a.shape, dtype=mx.bfloat16)
    tokenizer = load_tokenizer(TOKENIZER)
    options = {"max_tokens": a.answer}  # greedy

    # Warm up (kernel compilation), then hold turns 1..N-1.
    list(stream_generate(model, tokenizer, "Hello", max_tokens=4))
    session = ChatSession(model, tokenizer)
    for q in questions[:-1]:
        list(session.send(q, **options))
    messages = [*session.messages, {"role": "user", "content": questions[-1]}]
    saved = Path(tempfile.mkdtemp()) / "session.safetensors"
    session.save(saved)

    fresh_tokens = len(encode_prompt(tokenizer, messages))
    reuse, fresh, reuse_tokens = [], [], 0
    for _ in range(a.repeats):
        s = ChatSession.load(saved, model, tokenizer)
        reuse.append(first_token_seconds(s.send(questions[-1], **options)))
        reuse_tokens = s.last_prefill_tokens
        fresh.append(first_token_seconds(stream_generate(model, tokenizer, messages, **options)))
    t_reuse, t_fresh = statistics.median(reuse), statistics.median(fresh)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, mlx {mx.__version__}, "
        f"{mx.default_device()}"
    )
    print(
        f"{a.shape} bf16 random weights, real tokenizer; turn {a.turns} of a {a.turns}-turn chat, "
        f"earlier answers {a.answer} tokens (greedy); median of {a.repeats}"
    )
    print(f"{'mode':<12} {'prefilled':>10} {'TTFT (s)':>10} {'speed-up':>9}")
    print(f"{'re-prefill':<12} {fresh_tokens:>10} {t_fresh:>10.3f} {1.0:>8.1f}x")
    print(f"{'session':<12} {reuse_tokens:>10} {t_reuse:>10.3f} {t_fresh / t_reuse:>8.1f}x")


if __name__ == "__main__":
    main()
