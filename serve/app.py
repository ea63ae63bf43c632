"""The Starlette app (both APIs' routes, the API key, error shapes) and its uvicorn server.

Routes are thin: parse and validate the body (`web.parse_body`), translate it to a
`Job` off the event loop, `Service.submit` it, and shape the engine's responses. Every
error leaves as the API's own error object: paths under ``/api/`` get Ollama's
``{"error": "..."}``, all others OpenAI's. Unknown routes are 404, wrong methods 405,
and an unexpected failure is a 500 that says so (never the answer to a user mistake).

`Server` is uvicorn's server with one change: on shutdown (Ctrl+C, SIGTERM, or
``should_exit``) it first ends every running answer with an error and refuses new
ones, so uvicorn's wait for open connections never hangs on a long generation.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import ollama_api, openai_api
from .errors import APIError
from .service import Service

log = logging.getLogger("granite_mlx.serve")

# Reachable without the API key: liveness checks.
_OPEN_PATHS = ("/", "/health")


def _is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_response(path: str, err: APIError) -> JSONResponse:
    body = err.ollama() if _is_ollama(path) else err.openai()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(request.url.path, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    method, path = request.method, request.url.path
    if exc.status_code == 404:
        err = APIError(
            404,
            f"there is no route {method} {path}. This server answers OpenAI's "
            "/v1/chat/completions, /v1/completions, /v1/models and Ollama's "
            "/api/chat, /api/generate, /api/tags, /api/show, /api/version",
            code="unknown_url",
        )
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        err = APIError(
            405, f"{path} does not take {method}; use {allowed}", headers={"Allow": allowed}
        )
    else:
        err = APIError(exc.status_code, str(exc.detail), headers=exc.headers)
    return error_response(path, err)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    err = APIError(500, f"internal server error ({type(exc).__name__}: {exc})")
    return error_response(request.url.path, err)


class RequestLog:
    """ASGI middleware: one log line per request (status, time, and for answers the
    prompt, cached and generated tokens, time to first token, finish reason)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            flight = scope.get("state", {}).get("flight")
            log.info(
                "%s %s %s %.2fs%s",
                scope["method"],
                scope["path"],
                status or "-",
                time.perf_counter() - start,
                f" {flight.answer.summary()}" if flight is not None else "",
            )


class APIKey:
    """ASGI middleware: every route but the liveness checks needs ``Authorization: Bearer KEY``."""

    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        what = "no API key was sent" if not header else "the API key is wrong"
        err = APIError(
            401,
            f"{what}: send 'Authorization: Bearer <key>' with the key given "
            "to granite-mlx serve --api-key",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error_response(scope["path"], err)(scope, receive, send)


async def _root(request: Request) -> Response:
    return PlainTextResponse("granite-mlx is running")


async def _health(request: Request) -> Response:
    service: Service = request.app.state.service
    return JSONResponse(service.health(), status_code=503 if service.closing else 200)


def create_app(
    service: Service, api_key: str | None = None, log_requests: bool = False
) -> Starlette:
    """The ASGI app serving ``service``'s model on both APIs."""
    routes = [
        Route("/", _root, methods=["GET", "HEAD"]),
        Route("/health", _health, methods=["GET"]),
        Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai_api.completions, methods=["POST"]),
        Route("/v1/models", openai_api.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", openai_api.get_model, methods=["GET"]),
        Route("/api/chat", ollama_api.chat, methods=["POST"]),
        Route("/api/generate", ollama_api.generate, methods=["POST"]),
        Route("/api/tags", ollama_api.tags, methods=["GET"]),
        Route("/api/ps", ollama_api.ps, methods=["GET"]),
        Route("/api/show", ollama_api.show, methods=["POST"]),
        Route("/api/version", ollama_api.version, methods=["GET"]),
    ]
    handlers: dict[Any, Any] = {
        APIError: _api_error,
        HTTPException: _http_error,
        Exception: _unexpected,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.service = service
    if api_key:
        app.add_middleware(APIKey, key=api_key)
    if log_requests:
        app.add_middleware(RequestLog)  # added last: outermost, so refused requests log too
    return app


class Server(uvicorn.Server):
    """uvicorn, ending the running answers before it waits for connections to close."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Ctrl+C and SIGTERM start the shutdown (a second Ctrl+C forces it).

        Unlike uvicorn's own, the signal is not raised again once the server stopped:
        the command still has its engine to stop and its exit status to give.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: Any = None) -> None:
        await self.service.drain()
        await super().shutdown(sockets=sockets)
