"""OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models.

Answers are shaped as OpenAI's own: ``chat.completion`` objects, or with
``stream: true`` server-sent events of ``chat.completion.chunk`` objects ending in
``data: [DONE]``. The first chunk carries the role; tool calls stream as OpenAI
streams them (a chunk with the call's index, id and name and empty arguments, then
the arguments as a JSON string); with ``stream_options.include_usage`` a last chunk
with no choices carries the usage. An answer that fails after the stream has started
(the server shutting down, an engine error) ends with an ``{"error": ...}`` event,
which the openai client raises.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .schemas import ChatCompletionRequest, CompletionRequest
from .service import Answer, Flight, Service, Step
from .translate import Job
from .web import parse_body, respond, start

SSE = "text/event-stream"


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _call_delta(index: int, call: Any) -> list[dict[str, Any]]:
    """One tool call as OpenAI streams it: header first, then the arguments."""
    args = call.to_openai()["function"]["arguments"]
    head = {
        "index": index,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": ""},
    }
    return [
        {"tool_calls": [head]},
        {"tool_calls": [{"index": index, "function": {"arguments": args}}]},
    ]


# --------------------------------------------------------------------------
# Chat completions
# --------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    service: Service = request.app.state.service
    body = await parse_body(request, ChatCompletionRequest)
    service.check_model(body.model)
    flight = await start(request, service.translator.chat, body)
    meta = {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "created": int(time.time()),
        "model": body.model,
    }
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    stream = (lambda: _chat_stream(service, flight, meta, include_usage)) if body.stream else None
    return await respond(
        request, flight, stream, SSE, lambda answer: _chat_completion(answer, meta, flight.job)
    )


def _chat_completion(answer: Answer, meta: dict[str, Any], job: Job) -> dict[str, Any]:
    text = answer.full_text()
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if answer.calls:
        message["tool_calls"] = [c.to_openai() for c in answer.calls]
        if not text.strip():
            message["content"] = None
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": answer.logprobs, "refusal": None} if job.logprobs else None,
        "finish_reason": answer.finish_reason(),
    }
    return {
        **meta,
        "object": "chat.completion",
        "choices": [choice],
        "usage": answer.usage(),
        "system_fingerprint": None,
    }


async def _chat_stream(
    service: Service, flight: Flight, meta: dict[str, Any], include_usage: bool
) -> AsyncIterator[bytes]:
    job = flight.job

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs=None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        obj = {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [choice],
            "system_fingerprint": None,
        }
        if include_usage:
            obj["usage"] = None
        return _sse(obj)

    yield chunk({"role": "assistant", "content": ""})
    index = 0
    async for r in flight.responses():
        step: Step = service.add(flight, r)
        if step.text or step.logprobs:
            logprobs = {"content": step.logprobs, "refusal": None} if job.logprobs else None
            yield chunk({"content": step.text}, logprobs=logprobs)
        for call in step.calls:
            for delta in _call_delta(index, call):
                yield chunk(delta)
            index += 1
    answer = flight.answer
    if not answer.ok:
        yield _sse(answer.failure(service.closing).openai())
        return
    yield chunk({}, finish=answer.finish_reason())
    if include_usage:
        obj = {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": answer.usage(),
            "system_fingerprint": None,
        }
        yield _sse(obj)
    yield b"data: [DONE]\n\n"


# --------------------------------------------------------------------------
# Completions (plain text)
# --------------------------------------------------------------------------


def _legacy_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """The completions endpoint's older log-probability layout."""
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out


async def completions(request: Request) -> Response:
    service: Service = request.app.state.service
    body = await parse_body(request, CompletionRequest)
    service.check_model(body.model)
    flight = await start(request, service.translator.completion, body)
    meta = {
        "id": "cmpl-" + uuid.uuid4().hex[:24],
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
    }
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    stream = (
        (lambda: _completion_stream(service, flight, meta, include_usage)) if body.stream else None
    )
    return await respond(
        request, flight, stream, SSE, lambda answer: _completion(answer, meta, flight.job)
    )


def _completion(answer: Answer, meta: dict[str, Any], job: Job) -> dict[str, Any]:
    choice = {
        "index": 0,
        "text": job.echo + answer.full_text(),
        "logprobs": _legacy_logprobs(answer.logprobs, len(job.echo)) if job.logprobs else None,
        "finish_reason": answer.finish_reason(),
    }
    return {**meta, "choices": [choice], "usage": answer.usage()}


async def _completion_stream(
    service: Service, flight: Flight, meta: dict[str, Any], include_usage: bool
) -> AsyncIterator[bytes]:
    job = flight.job
    offset = len(job.echo)

    def chunk(text: str, finish: str | None = None, logprobs=None) -> bytes:
        obj = {
            **meta,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None
        return _sse(obj)

    if job.echo:
        yield chunk(job.echo)
    async for r in flight.responses():
        step = service.add(flight, r)
        if step.text or step.logprobs:
            logprobs = _legacy_logprobs(step.logprobs, offset) if job.logprobs else None
            offset += sum(len(e["token"]) for e in step.logprobs)
            yield chunk(step.text, logprobs=logprobs)
    answer = flight.answer
    if not answer.ok:
        yield _sse(answer.failure(service.closing).openai())
        return
    yield chunk("", finish=answer.finish_reason())
    if include_usage:
        yield _sse({**meta, "choices": [], "usage": answer.usage()})
    yield b"data: [DONE]\n\n"


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def _model_card(service: Service) -> dict[str, Any]:
    return {
        "id": service.model_id,
        "object": "model",
        "created": service.created,
        "owned_by": "granite-mlx",
    }


async def list_models(request: Request) -> Response:
    service: Service = request.app.state.service
    return JSONResponse({"object": "list", "data": [_model_card(service)]})


async def get_model(request: Request) -> Response:
    service: Service = request.app.state.service
    service.check_model(request.path_params["model"])
    return JSONResponse(_model_card(service))
