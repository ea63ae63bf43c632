"""What every route shares: the engine, admission, and the answer being assembled.

`Service.submit` hands a `Job` to the engine thread (a 503 when its queue is full,
or while shutting down) and returns a `Flight`: the engine stream plus its
bookkeeping. A flight is always ended by `Service.release`,
which cancels the engine row if the answer did not finish (the client hung up), so
no abandoned request keeps decoding.

`Answer` turns the engine's `GenerationResponse` steps into what both APIs report:
text, tool calls (each once, as the engine may repeat the complete list on the final
step), token log-probabilities, counts and timings.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granite_mlx.engine import EngineShutdown, GenerationResponse, QueueFullError
from granite_mlx.errors import GraniteError, PromptTooLongError

from .errors import APIError
from .translate import Job, Translator

SHUTTING_DOWN = "the server is shutting down"


def model_name(model: str) -> str:
    """The name clients use: a Hub repo id as is, a local folder by its own name."""
    path = Path(model).expanduser()
    if model.startswith(("/", ".", "~")) or path.is_dir():
        return path.resolve().name
    return model


class Flight:
    """One admitted request: its engine stream, job, and timings."""

    def __init__(self, stream: Any, job: Job, route: str):
        self.stream = stream
        self.job = job
        self.route = route
        self.finished = False
        self.answer = Answer(job)

    async def responses(self) -> AsyncIterator[GenerationResponse]:
        """The engine's responses; an engine that stops or fails ends the answer with an
        "error" response (the routes send it as the API's error)."""
        try:
            async for r in self.stream:
                if r.finish_reason is not None:
                    self.finished = True
                yield r
                if self.finished:
                    return
        except GraniteError as exc:
            # EngineShutdown, or a request the engine thread refused after submit's
            # checks (a GenerationError: the request's fault, a 400).
            self.finished = True
            self.answer.error = str(exc)
            self.answer.refused = not isinstance(exc, EngineShutdown)
            yield GenerationResponse("", None, None, "error")


@dataclass
class Step:
    """What one engine response adds to the answer."""

    text: str = ""
    calls: list[Any] = field(default_factory=list)  # new valid ToolCalls
    logprobs: list[dict[str, Any]] = field(default_factory=list)


class Answer:
    """The answer so far, shaped for the APIs."""

    def __init__(self, job: Job):
        self.job = job
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.calls: list[Any] = []
        self._seen_calls: set[str] = set()
        self.logprobs: list[dict[str, Any]] = []
        self.finish: str | None = None
        self.error: str | None = None
        self.refused = False  # the engine refused the request (its fault, not the server's)
        self.cached_tokens = 0
        self.generated = 0
        self.start = time.perf_counter()
        self.first: float | None = None
        self.end: float | None = None

    def add(self, r: GenerationResponse, eos: set[int], token_text: Any) -> Step:
        step = Step(text=r.text)
        if r.token is not None:
            if self.first is None:
                self.first = time.perf_counter()
            self.tokens.append(r.token)
            if self.job.logprobs and r.token not in eos:
                step.logprobs.append(self._logprob(r, token_text))
        for call in r.tool_calls:
            if call.id in self._seen_calls:
                continue
            self._seen_calls.add(call.id)
            if self.job.tools and call.valid:
                step.calls.append(call)
            else:  # no tools were offered, or the call is broken: the model's words stand
                step.text += call.raw
        self.text.append(step.text)
        self.calls += step.calls
        self.logprobs += step.logprobs
        self.cached_tokens = r.cached_tokens
        self.generated = r.generation_tokens
        if r.finish_reason is not None:
            self.end = time.perf_counter()
            self.finish = r.finish_reason
            if r.finish_reason == "error":
                self.error = self.error or "generation failed"
        return step

    def _logprob(self, r: GenerationResponse, token_text: Any) -> dict[str, Any]:
        text, raw = token_text(r.token)
        entry = {"token": text, "logprob": _finite(r.logprob), "bytes": list(raw)}
        tops = []
        for token, logprob in (r.top_logprobs or [])[: self.job.top_logprobs]:
            t, b = token_text(token)
            tops.append({"token": t, "logprob": _finite(logprob), "bytes": list(b)})
        entry["top_logprobs"] = tops
        return entry

    @property
    def ok(self) -> bool:
        return self.finish in ("stop", "length")

    def full_text(self) -> str:
        return "".join(self.text)

    def failure(self, closing: bool) -> APIError:
        """The error for an answer that did not finish: 400 if the engine refused the
        request, 503 while the server stops, 500 when generation itself failed."""
        if self.refused:
            return APIError(400, self.error or "the engine refused the request")
        if self.finish == "cancelled" or closing:
            return APIError(503, self.error or SHUTTING_DOWN, headers={"Retry-After": "5"})
        return APIError(500, self.error or "generation failed")

    def finish_reason(self) -> str:
        """OpenAI's finish_reason (Ollama's done_reason takes the same, but tool_calls)."""
        if self.finish == "stop" and self.calls:
            return "tool_calls"
        return self.finish or "stop"

    def usage(self) -> dict[str, Any]:
        prompt = len(self.job.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.generated,
            "total_tokens": prompt + self.generated,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    def summary(self) -> str:
        """One line for the request log."""
        ttft = self.ttft()
        return (
            f"prompt={len(self.job.prompt_ids)} cached={self.cached_tokens} "
            f"generated={self.generated} ttft={'-' if ttft is None else f'{ttft:.2f}s'} "
            f"finish={self.finish or 'hung up'}"
        )


def _finite(x: float | None) -> float:
    """JSON has no -inf: a token the mask ruled out reports the most negative float."""
    if x is None:
        return 0.0
    return x if math.isfinite(x) else -9999.0


class Service:
    """The engine and everything the routes share."""

    def __init__(
        self,
        engine: Any,
        model: Any,
        tokenizer: Any,
        model_id: str,
        prompt_cache: Any = None,
        aliases: tuple[str, ...] = (),
        drafting: tuple | None = None,
    ):
        self.engine = engine
        self.prompt_cache = prompt_cache
        self.model = model
        self.tokenizer = tokenizer
        self.translator = Translator(model, tokenizer, drafting)
        self.model_id = model_id
        self.aliases = aliases  # other names clients may use (the --model argument as given)
        self.created = int(time.time())
        self.eos = set(tokenizer.eos_token_ids)
        self.flights: set[Flight] = set()
        self.closing = False
        self._token_text: dict[int, tuple[str, bytes]] = {}
        self._parameters: int | None = None
        self._byte_decoder = _byte_decoder()

    # --- models -------------------------------------------------------------------

    def model_parameters(self) -> int:
        """Parameter count, a quantized weight counted by the values it packs."""
        if self._parameters is None:
            self._parameters, self._bytes, self._quantization = _weigh(self.model)
        return self._parameters

    def model_bytes(self) -> int:
        self.model_parameters()
        return self._bytes

    def quantization(self) -> str:
        """Ollama's quantization_level spelling: Q4, Q8, F16, BF16, F32."""
        self.model_parameters()
        return self._quantization

    def digest(self) -> str:
        return hashlib.sha256(f"{self.model_id}@{self.created}".encode()).hexdigest()

    def names(self) -> set[str]:
        """The model names requests may use: the id, its last part, the aliases, each
        also with Ollama's ":latest" tag."""
        names = {self.model_id, self.model_id.rsplit("/", 1)[-1], *self.aliases}
        return names | {f"{n}:latest" for n in names}

    def check_model(self, name: str, field: str = "model") -> None:
        if name not in self.names():
            raise APIError(
                404,
                f"{field}: the model {name!r} is not served here; this server runs "
                f"{self.model_id!r}",
                param=field,
                code="model_not_found",
            )

    def health(self) -> dict[str, Any]:
        """What /health reports: requests in the engine, the prompt cache, MLX memory."""
        import mlx.core as mx

        running, waiting = self.engine.load
        out: dict[str, Any] = {
            "status": "shutting down" if self.closing else "ok",
            "model": self.model_id,
            "requests": {"running": running, "waiting": waiting, "open": len(self.flights)},
            "memory_gb": {
                "active": round(mx.get_active_memory() / 1e9, 4),
                "cache": round(mx.get_cache_memory() / 1e9, 4),
                "peak": round(mx.get_peak_memory() / 1e9, 4),
            },
        }
        c = self.prompt_cache
        if c is not None:
            out["prompt_cache"] = {
                "bytes": c.nbytes, "max_bytes": c.max_bytes, "hits": c.hits,
                "misses": c.misses, "tokens_reused": c.tokens_reused, "evictions": c.evictions,
            }  # fmt: skip
        return out

    # --- flights ------------------------------------------------------------------

    def submit(self, job: Job, route: str, state: Any = None) -> Flight:
        """Hand a job to the engine; raises APIError for a full queue or a refused prompt.

        ``state`` (the request's Starlette state) gets the flight, for the request log.
        """
        if self.closing:
            raise APIError(503, SHUTTING_DOWN, headers={"Retry-After": "5"})
        try:
            stream = self.engine.submit(job.request)
        except QueueFullError as exc:
            raise APIError(
                503, f"the server is busy: {exc}", code="overloaded", headers={"Retry-After": "1"}
            ) from None
        except EngineShutdown as exc:
            raise APIError(503, f"{SHUTTING_DOWN} ({exc})", headers={"Retry-After": "5"}) from None
        except PromptTooLongError as exc:
            raise APIError(
                400,
                str(exc),
                param="messages" if "chat" in route else "prompt",
                code="context_length_exceeded",
            ) from None
        except GraniteError as exc:
            raise APIError(400, str(exc)) from None
        flight = Flight(stream, job, route)
        self.flights.add(flight)
        if state is not None:
            state.flight = flight
        return flight

    def release(self, flight: Flight) -> None:
        """The route is done with a flight: stop the engine row if it still runs."""
        if not flight.finished:
            flight.stream.cancel()
        self.flights.discard(flight)

    async def drain(self, timeout: float = 10.0) -> None:
        """Refuse new requests and end the running ones (each ends with an error)."""
        self.closing = True
        for flight in list(self.flights):
            flight.stream.cancel()
        deadline = time.monotonic() + timeout
        while self.flights and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def add(self, flight: Flight, r: GenerationResponse) -> Step:
        step = flight.answer.add(r, self.eos, self.token_text)
        if r.finish_reason == "cancelled" and self.closing:
            flight.answer.error = SHUTTING_DOWN
        return step

    # --- tokens as text -----------------------------------------------------------

    def token_text(self, token: int) -> tuple[str, bytes]:
        """A token's text and its exact bytes (a token may hold part of a character)."""
        cached = self._token_text.get(token)
        if cached is None:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str) and all(c in self._byte_decoder for c in piece):
                raw = bytes(self._byte_decoder[c] for c in piece)  # byte-level BPE
            else:
                raw = self.tokenizer.decode([token]).encode()
            cached = self._token_text[token] = (raw.decode("utf-8", errors="replace"), raw)
        return cached


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for bytes, reversed (GPT-2's convention:
    printable Latin-1 bytes stand for themselves, the others shift to 256 and up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    decoder, extra = {}, 0
    for b in range(256):
        if b in printable:
            decoder[chr(b)] = b
        else:
            decoder[chr(256 + extra)] = b
            extra += 1
    return decoder


def _weigh(model: Any) -> tuple[int, int, str]:
    """(parameters, bytes, quantization level) of a model's weights."""
    import mlx.core as mx

    parameters = size = 0
    bits: set[int] = set()
    dtypes: set[str] = set()
    for _, module in model.named_modules():
        packed = getattr(module, "bits", None)
        for name, value in module.items():
            if not isinstance(value, mx.array):
                continue
            size += value.nbytes
            if packed and name == "weight":
                parameters += value.size * 32 // packed
                bits.add(packed)
            elif not (packed and name in ("scales", "biases")):
                parameters += value.size
                dtypes.add(str(value.dtype).rsplit(".", 1)[-1])
    if bits:
        level = "Q" + "/".join(str(b) for b in sorted(bits))
    else:
        level = next((d for d in ("bfloat16", "float16", "float32") if d in dtypes), "float32")
        level = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[level]
    return parameters, size, level
