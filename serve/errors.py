"""Errors the server answers with, in the shape each API's clients expect.

Every user mistake becomes an `APIError` with a 4xx status and a message that names
the field and the fix; the routes never let one turn into a 500. OpenAI clients read
``{"error": {"message", "type", "param", "code"}}``, Ollama clients ``{"error": "..."}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from .schemas import FieldError

# OpenAI's error "type" for each status we send.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_error",
}


class APIError(Exception):
    """An answer other than 200: status, message, and the request field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def openai(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _OPENAI_TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def ollama(self) -> dict[str, Any]:
        return {"error": self.message}


def field_path(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def from_validation(exc: ValidationError) -> APIError:
    """A 400 naming the first bad field (and how many more there are)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    # Union members and validators add their own names to the path: keep the fields.
    loc = tuple(
        p
        for p in first["loc"]
        if isinstance(p, int) or not (p.startswith(("function-", "literal[")) or "[" in p)
    )
    path = field_path(loc)
    message = first["msg"].removeprefix("Value error, ")
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        path, message = ".".join(p for p in (path, cause.field) if p), str(cause)
    if first["type"] == "missing":
        message = "this field is required"
    elif first["type"] == "extra_forbidden":
        message = "unknown field"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    text = f"{path}: {message}" if path else message
    return APIError(400, text + (more if len(errors) > 1 else ""), param=path or None)
