"""A live server for the tests: uvicorn on a free 127.0.0.1 port, on a thread, over a
real engine thread with the real-vocabulary tiny model, plus hooks the tests need.

`HookedEngine` wraps the engine thread: it can add logits processors to the next
request (to force a random model to write a tool call, or to slow or count its
steps), and keeps every request it was given.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import uvicorn
from granite_mlx.serve import Server, Service, create_app
from test_generate import EOS, real_vocab_folder

from granite_mlx import PromptCache, load
from granite_mlx.engine import EngineThread

MODEL_ID = "granite-tiny"


class HookedEngine:
    def __init__(self, engine: Any, cache: Any = None):
        self.engine = engine
        self.cache = cache
        self.next_processors: list[Callable] = []
        self.requests: list[Any] = []

    def add_to_next(self, *processors: Callable) -> None:
        self.next_processors += processors

    def submit(self, request: Any) -> Any:
        if self.next_processors:
            extra, self.next_processors = self.next_processors, []
            request = dataclasses.replace(
                request, logits_processors=(*request.logits_processors, *extra)
            )
        self.requests.append(request)
        return self.engine.submit(request)

    @property
    def load(self) -> tuple[int, int]:
        return self.engine.load

    def shutdown(self) -> None:
        self.engine.shutdown()


def server_model():
    """The server's own copy of the model (the tests' reference runs use another)."""
    return load(real_vocab_folder(), dtype="float32")


class LiveServer:
    """`Server` on a thread; ``stop()`` is what Ctrl+C does."""

    def __init__(
        self,
        max_batch: int = 8,
        max_queue: int = 64,
        api_key: str | None = None,
        engine: HookedEngine | None = None,
        prompt_cache_bytes: int = 256 * 2**20,
        model_id: str = MODEL_ID,
    ):
        model, tokenizer = server_model()
        self.own_engine = engine is None
        if engine is None:
            cache = PromptCache(prompt_cache_bytes)
            engine = HookedEngine(
                EngineThread(
                    model, tokenizer, max_batch=max_batch, max_queue=max_queue, prompt_cache=cache
                ),
                cache,
            )
        self.engine = engine
        self.service = Service(engine, model, tokenizer, model_id, prompt_cache=engine.cache)
        config = uvicorn.Config(
            create_app(self.service, api_key=api_key),
            lifespan="off",
            access_log=False,
            log_level="warning",
        )
        self.server = Server(config, self.service)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.own_engine:
            self.engine.shutdown()
        assert not self.thread.is_alive(), "the server did not stop"


def count_steps(counter: list[int], delay: float = 0.0) -> Callable:
    """A logits processor that counts its row's decode steps, may slow each one, and
    never lets the row end by itself (EOS ruled out): it runs until cancelled."""

    def processor(history: Any, logits: Any) -> Any:
        counter[0] += 1
        if delay:
            time.sleep(delay)
        return mx.where(mx.arange(logits.shape[-1]) == EOS, -1e9, logits)

    return processor


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def ndjson(lines: Sequence[str]) -> list[dict]:
    import json

    return [json.loads(line) for line in lines if line.strip()]
