"""Size of a chat's session cache file (what the chat app keeps in sessions/) by turn.

A random-weight model of a released shape (H-350M by default, bf16) with the real
Granite tokenizer answers a few short turns in one ChatSession; after each turn the
session is saved the way the chat app saves it, and the file's size printed. The size
is the cache (Mamba2 states, attention K/V) plus its turn-boundary snapshots, so it
depends on the shape and the number of snapshots far more than on the chat's length.

    python benchmarks/session_file_size.py | tee benchmarks/results/session_file_size_cpu.log
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import mlx.core as mx

from granite_mlx import ChatSession
from granite_mlx.shapes import random_model
from granite_mlx.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizer"
QUESTIONS = [
    "What is the capital of France?",
    "How many people live there, roughly?",
    "Name three museums in that city.",
    "Which of them would you visit first?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="h-350m")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--answer", type=int, default=8, help="tokens per answer (greedy)")
    a = ap.parse_args()
    print(f"machine: {platform.machine()}, mlx {mx.__version__}, {mx.default_device()}")
    print(f"{a.shape} bf16 random weights, real tokenizer, answers of {a.answer} tokens")
    model = random_model(a.shape, dtype=mx.bfloat16)
    tokenizer = load_tokenizer(TOKENIZER)
    session = ChatSession(model, tokenizer)
    path = Path(tempfile.mkdtemp()) / "chat-1.safetensors"
    print("turn  file MB")
    for turn, question in enumerate((QUESTIONS * a.turns)[: a.turns], start=1):
        list(session.send(question, max_tokens=a.answer))
        session.save(path)
        print(f"{turn:4d}  {path.stat().st_size / 1e6:7.1f}")


if __name__ == "__main__":
    main()
