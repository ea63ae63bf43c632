"""HTTP plumbing the routes share: reading bodies, and answers that notice a hang-up.

A client that disconnects must free its engine row within one decode step, whether
it was reading a stream or waiting for a whole answer. Both paths therefore listen
for the ASGI ``http.disconnect`` message while the answer is produced, and cancel
the work when it arrives (`collect` for whole answers, `EngineResponse` for
streams); `Service.release` then cancels the engine stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .errors import APIError, from_validation
from .service import Answer, Flight, Service
from .translate import Job

# A 128K-token prompt is about half a megabyte of text; anything far larger is a mistake.
MAX_BODY_BYTES = 32 * 1024 * 1024

Body = TypeVar("Body", bound=BaseModel)


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The JSON body, validated; a 400 naming the field, or 413 when too large."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    raw = bytearray()
    try:
        async for piece in request.stream():
            raw += piece
            if len(raw) > MAX_BODY_BYTES:
                raise _too_large()
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the body") from None
    if not raw:
        raise APIError(400, "the request has no body; send a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None


def _too_large() -> APIError:
    return APIError(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB")


async def start(request: Request, build: Callable[[Any], Job], body: Any) -> Flight:
    """Translate the body (template rendering, tokenization: off the event loop) and
    hand the job to the engine."""
    service: Service = request.app.state.service
    job = await run_in_threadpool(build, body)
    return service.submit(job, request.url.path, request.state)


async def whole_answer(request: Request, flight: Flight) -> Answer | None:
    """The finished answer, or None if the client hung up first (the row is then
    cancelled); an APIError if the answer could not finish."""
    service: Service = request.app.state.service
    answer = await collect(request, service, flight)
    if answer is not None and not answer.ok:
        raise answer.failure(service.closing)
    return answer


@contextlib.contextmanager
def cancelled_on_disconnect(receive: Receive) -> Iterator[anyio.CancelScope]:
    """Run the body until it ends or the client disconnects, whichever comes first.

    (A plain cancel scope and a watcher task, not a task group: a task group would
    wrap every error of the body in an ExceptionGroup.)
    """

    async def watch(scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    with anyio.CancelScope() as scope:
        watcher = asyncio.ensure_future(watch(scope))
        try:
            yield scope
        finally:
            watcher.cancel()


async def collect(request: Request, service: Service, flight: Flight) -> Answer | None:
    """The whole answer, or None if the client hung up first (the row is then cancelled)."""
    try:
        with cancelled_on_disconnect(request.receive) as scope:
            async for r in flight.responses():
                service.add(flight, r)
    finally:
        service.release(flight)
    return None if scope.cancel_called and not flight.finished else flight.answer


async def respond(
    request: Request,
    flight: Flight,
    stream: Callable[[], AsyncIterator[bytes]] | None,
    media_type: str,
    whole: Callable[[Answer], dict[str, Any]],
) -> Response:
    """Stream the answer as ``stream()``'s events, or wait for it and send ``whole(answer)``."""
    if stream is not None:
        return EngineResponse(stream(), request.app.state.service, flight, media_type)
    answer = await whole_answer(request, flight)
    if answer is None:
        return Response(status_code=499)  # the client hung up: nobody reads this
    return JSONResponse(whole(answer))


class EngineResponse(Response):
    """A streamed answer (SSE or NDJSON) that cancels its engine row when the client leaves."""

    def __init__(
        self, body: AsyncIterator[bytes], service: Service, flight: Flight, media_type: str
    ):
        self.body_iterator = body
        self.service = service
        self.flight = flight
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with cancelled_on_disconnect(receive):
                await send(
                    {
                        "type": "http.response.start",
                        "status": self.status_code,
                        "headers": self.raw_headers,
                    }
                )
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke while sending
            pass
        finally:
            self.service.release(self.flight)
