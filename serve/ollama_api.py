"""Ollama's API: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version.

Streaming is Ollama's default: one JSON object per line (NDJSON), the last with
``"done": true``, the reason (``done_reason``) and the counts and durations
(nanoseconds) Ollama reports: ``prompt_eval_count`` counts the prompt tokens actually
processed (those the prompt cache did not hold), as Ollama's own does. Tool calls come
as ``message.tool_calls`` with ``arguments`` as an object. An empty request (no
messages, or an empty prompt) loads nothing and answers ``done_reason: "load"``, which
is how Ollama apps check that a model is ready.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from granite_mlx import __version__

from .schemas import OllamaChatRequest, OllamaGenerateRequest, OllamaShowRequest
from .service import Answer, Flight, Service
from .web import parse_body, respond, start

# Ollama apps check the server's version before using newer endpoints (tools came in
# 0.3, structured outputs in 0.5): report the API level this server implements.
OLLAMA_API_VERSION = "0.6.0"


NDJSON = "application/x-ndjson"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def _counts(answer: Answer) -> dict[str, Any]:
    end = answer.end or time.perf_counter()
    first = answer.first or end
    ns = 1_000_000_000
    return {
        "total_duration": int((end - answer.start) * ns),
        "load_duration": 0,
        "prompt_eval_count": len(answer.job.prompt_ids) - answer.cached_tokens,
        "prompt_eval_duration": int((first - answer.start) * ns),
        "eval_count": answer.generated,
        "eval_duration": int((end - first) * ns),
    }


def _done_reason(answer: Answer) -> str:
    return "length" if answer.finish == "length" else "stop"


def _done(answer: Answer, head: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The last object of an answer: its fields, why it ended, the counts and durations."""
    return {
        **head,
        "created_at": _now(),
        **fields,
        "done_reason": _done_reason(answer),
        "done": True,
        **_counts(answer),
    }


def _ollama_calls(calls: list[Any]) -> list[dict[str, Any]]:
    return [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]


# --------------------------------------------------------------------------
# /api/chat
# --------------------------------------------------------------------------


async def chat(request: Request) -> Response:
    service: Service = request.app.state.service
    body = await parse_body(request, OllamaChatRequest)
    service.check_model(body.model)
    head = {"model": body.model}
    if not body.messages:
        return JSONResponse(
            {
                **head,
                "created_at": _now(),
                "message": {"role": "assistant", "content": ""},
                "done_reason": "load",
                "done": True,
            }
        )
    flight = await start(request, service.translator.ollama_chat, body)
    stream = (lambda: _chat_stream(service, flight, head)) if body.stream else None
    return await respond(request, flight, stream, NDJSON, lambda answer: _chat(answer, head))


def _chat(answer: Answer, head: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.full_text()}
    if answer.calls:
        message["tool_calls"] = _ollama_calls(answer.calls)
    return _done(answer, head, message=message)


async def _chat_stream(service: Service, flight: Flight, head: dict) -> AsyncIterator[bytes]:
    async for r in flight.responses():
        step = service.add(flight, r)
        if step.text or step.calls:
            message: dict[str, Any] = {"role": "assistant", "content": step.text}
            if step.calls:
                message["tool_calls"] = _ollama_calls(step.calls)
            yield _line({**head, "created_at": _now(), "message": message, "done": False})
    answer = flight.answer
    if not answer.ok:
        yield _line(answer.failure(service.closing).ollama())
        return
    yield _line(_done(answer, head, message={"role": "assistant", "content": ""}))


# --------------------------------------------------------------------------
# /api/generate
# --------------------------------------------------------------------------


async def generate(request: Request) -> Response:
    service: Service = request.app.state.service
    body = await parse_body(request, OllamaGenerateRequest)
    service.check_model(body.model)
    head = {"model": body.model}
    if not body.prompt:
        return JSONResponse(
            {**head, "created_at": _now(), "response": "", "done_reason": "load", "done": True}
        )
    flight = await start(request, service.translator.ollama_generate, body)
    stream = (lambda: _generate_stream(service, flight, head)) if body.stream else None
    return await respond(request, flight, stream, NDJSON, lambda answer: _generated(answer, head))


def _generated(answer: Answer, head: dict[str, Any]) -> dict[str, Any]:
    return _done(answer, head, response=answer.full_text(), context=_context(answer))


def _context(answer: Answer) -> list[int]:
    """The conversation so far as token ids, for the next request's ``context``."""
    return answer.job.prompt_ids + answer.tokens


async def _generate_stream(service: Service, flight: Flight, head: dict) -> AsyncIterator[bytes]:
    async for r in flight.responses():
        step = service.add(flight, r)
        if step.text:
            yield _line({**head, "created_at": _now(), "response": step.text, "done": False})
    answer = flight.answer
    if not answer.ok:
        yield _line(answer.failure(service.closing).ollama())
        return
    yield _line(_done(answer, head, response="", context=_context(answer)))


# --------------------------------------------------------------------------
# Models and version
# --------------------------------------------------------------------------


def _details(service: Service) -> dict[str, Any]:
    args = service.model.args
    n = service.model_parameters()
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": "granite",
        "families": ["granite"],
        "parameter_size": f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M",
        "quantization_level": service.quantization(),
        "model_type": getattr(args, "model_type", "granitemoehybrid"),
    }


async def tags(request: Request) -> Response:
    service: Service = request.app.state.service
    name = f"{service.model_id}:latest"
    modified = datetime.fromtimestamp(service.created, timezone.utc).isoformat()
    return JSONResponse(
        {
            "models": [
                {
                    "name": name,
                    "model": name,
                    "modified_at": modified,
                    "size": service.model_bytes(),
                    "digest": service.digest(),
                    "details": _details(service),
                }
            ]
        }
    )


async def ps(request: Request) -> Response:
    service: Service = request.app.state.service
    name = f"{service.model_id}:latest"
    return JSONResponse(
        {
            "models": [
                {
                    "name": name,
                    "model": name,
                    "size": service.model_bytes(),
                    "digest": service.digest(),
                    "details": _details(service),
                    "expires_at": "9999-12-31T23:59:59Z",
                    "size_vram": service.model_bytes(),
                }
            ]
        }
    )


async def show(request: Request) -> Response:
    service: Service = request.app.state.service
    body = await parse_body(request, OllamaShowRequest)
    service.check_model(body.model or body.name or "")
    args = service.model.args
    info = {
        "general.architecture": "granitehybrid",
        "general.parameter_count": service.model_parameters(),
        "granitehybrid.context_length": args.max_position_embeddings,
        "granitehybrid.embedding_length": args.hidden_size,
        "granitehybrid.block_count": args.num_hidden_layers,
        "granitehybrid.vocab_size": args.vocab_size,
    }
    template = getattr(service.tokenizer, "chat_template", None)
    return JSONResponse(
        {
            "modelfile": f"# served by granite-mlx {__version__}\nFROM {service.model_id}\n",
            "parameters": "",
            "template": template if isinstance(template, str) else "",
            "details": _details(service),
            "model_info": info,
            "capabilities": ["completion", "tools"],
            "modified_at": datetime.fromtimestamp(service.created, timezone.utc).isoformat(),
        }
    )


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_API_VERSION})
