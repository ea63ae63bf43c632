"""TEST-ONLY stand-in for ``granite_mlx.engine`` until the lead's engine lands on main.

Implements just the contract of /work/notes/ENGINE_API.md that the server uses
(``Request``, ``EngineThread.submit`` -> a stream iterable sync and async with
``cancel()``, ``shutdown()``; ``SamplingParams``) by running ``stream_from_ids`` one
request at a time on one thread: no batching, no prompt cache (``cached_tokens`` is
always 0). ``install()`` registers it as ``granite_mlx.engine``. Delete after the rebase.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import sys
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from granite_mlx import sampling
from granite_mlx.generate import GenerationResponse, stream_from_ids


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    seed: int | None = None

    def check(self) -> None:
        sampling.build_sampler(self.temperature, self.top_p, self.top_k, self.min_p)
        sampling.build_processors(self.repetition_penalty, self.repetition_context_size)


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int | None = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    logits_processors: Sequence[Callable] = ()
    top_logprobs: int = 0
    constraint: Any = None
    drafter: Any = None
    num_draft_tokens: int = 4
    cache: list | None = None
    snapshot_at: Sequence[int] = ()
    allow_long_prompt: bool = False
    prompt_progress: Callable[[int, int], None] | None = None


_END = object()


@dataclass
class Response(GenerationResponse):
    """The contract's new fields."""

    cached_tokens: int = 0
    top_logprobs: list = field(default_factory=list)


class Stream:
    def __init__(self, generator):
        self.generator = generator
        self.cancel_event = threading.Event()
        self._items: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async: asyncio.Queue | None = None
        self._lock = threading.Lock()
        try:
            self._loop = asyncio.get_running_loop()
            self._async = asyncio.Queue()
        except RuntimeError:
            pass

    def put(self, item) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:  # loop closed
                pass
        else:
            self._items.put(item)

    def cancel(self) -> None:
        self.cancel_event.set()

    def __iter__(self):
        while (item := self._items.get()) is not _END:
            yield item

    async def __aiter__(self):
        while (item := await self._async.get()) is not _END:
            yield item


class EngineThread:
    def __init__(self, model, tokenizer, max_batch: int = 8, prompt_cache=None, **_: Any):
        self.model, self.tokenizer = model, tokenizer
        self._queue: queue.Queue = queue.Queue()
        self._current: Stream | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="engine-shim")
        self._thread.start()

    def submit(self, request: Request) -> Stream:
        s = request.sampling
        s.check()
        stream = Stream(None)
        stream.generator = stream_from_ids(
            self.model, self.tokenizer, request.prompt, max_tokens=request.max_tokens,
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            repetition_context_size=s.repetition_context_size, seed=s.seed, stop=list(request.stop),
            logits_processors=list(request.logits_processors), cancel=stream.cancel_event,
            allow_long_prompt=request.allow_long_prompt,
        )  # fmt: skip
        self._queue.put(stream)
        return stream

    def _run(self) -> None:
        while (stream := self._queue.get()) is not None:
            self._current = stream
            if self._closed:
                stream.cancel()
            try:
                for r in stream.generator:
                    fields = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
                    stream.put(Response(**fields))
            except Exception as exc:  # noqa: BLE001 - an engine failure ends the stream
                stream.put(Response("", None, None, "error"))
                print("engine shim:", exc, file=sys.stderr)
            stream.put(_END)
            self._current = None

    def shutdown(self) -> None:
        self._closed = True
        if self._current is not None:
            self._current.cancel()
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                pending.put(Response("", None, None, "cancelled"))
                pending.put(_END)
        self._queue.put(None)
        self._thread.join(timeout=10)


def install() -> None:
    """Register the shim as granite_mlx.engine (and SamplingParams in granite_mlx.sampling)."""
    if "granite_mlx.engine" in sys.modules:
        return
    module = types.ModuleType("granite_mlx.engine")
    module.Request, module.EngineThread = Request, EngineThread
    sys.modules["granite_mlx.engine"] = module
    sampling.SamplingParams = SamplingParams
