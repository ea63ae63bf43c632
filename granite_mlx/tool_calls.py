"""Find Granite tool calls in generated text, while it streams.

Granite writes a call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.
:class:`ToolCallParser` takes text pieces as they are generated and returns the
text that can be shown now plus any calls completed so far. It never shows
tool-call markup: a tail that might be the start of ``<tool_call>`` is held
back until the next piece settles it. Bad calls become invalid
:class:`ToolCall` objects; the parser never raises on model output, whatever
its JSON holds (nesting past the recursion limit, integers of more digits than
Python converts, escaped lone surrogates). A call that passes is safe to send
back through a chat template, a JSON export or a database: its arguments are
at most MAX_DEPTH deep, hold only finite numbers and only encodable text. Given
the declared tools, a call to any other name is invalid too.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .surrogates import describe_surrogate, surrogate_at

__all__ = [
    "TOOL_CALL_END",
    "TOOL_CALL_START",
    "ParseUpdate",
    "ToolCall",
    "ToolCallParser",
    "parse_tool_calls",
    "tool_names",
]

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
MAX_DEPTH = 100  # nesting of a call's JSON: far above any real schema, far below recursion


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    """One tool call the model made.

    ``raw`` is the call's full markup as generated, tags included, so an invalid
    call can be shown or logged exactly. ``valid`` is False (and ``error`` says
    why) when the JSON is malformed or unsafe (see the module docstring), the
    name is missing or names no declared tool, or the call never closed.
    """

    name: str
    arguments: dict[str, Any]
    raw: str
    valid: bool = True
    error: str | None = None
    id: str = field(default_factory=_new_call_id)

    def to_openai(self) -> dict[str, Any]:
        """The call as an OpenAI ``tool_calls`` entry (arguments as a JSON string)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {
                "name": self.name,
                "arguments": json.dumps(self.arguments, ensure_ascii=False),
            },
        }


class ParseUpdate(NamedTuple):
    """What one :meth:`ToolCallParser.feed` (or ``finish``) produced."""

    text: str
    calls: list[ToolCall]


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    """json.loads, refusing NaN / Infinity and numbers that overflow a float."""
    return json.loads(text, parse_float=_finite, parse_constant=_no_constant)


def _unsafe(data: Any) -> str | None:
    """Why decoded JSON cannot travel further (too deep, unencodable text), or None."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"tool call is nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            stack += [(k, depth) for k in value] + [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
        elif isinstance(value, str) and (i := surrogate_at(value)) is not None:
            return f"tool call text is not valid Unicode ({describe_surrogate(value, i)})"
    return None


def _decode_call(body: str, raw: str, declared: frozenset[str] | None = None) -> ToolCall:
    """Build a ToolCall from the text between the tags."""

    def invalid(error: str, name: str = "") -> ToolCall:
        return ToolCall(name=name, arguments={}, raw=raw, valid=False, error=error)

    try:
        data = _loads(body)
    except json.JSONDecodeError as exc:
        return invalid(f"malformed JSON in tool call: {exc}")
    except (ValueError, RecursionError) as exc:  # a 5000-digit integer, NaN, [[[[...]]]]
        return invalid(f"malformed JSON in tool call ({type(exc).__name__}: {exc})")
    if (problem := _unsafe(data)) is not None:
        return invalid(problem)
    if not isinstance(data, dict):
        return invalid(f"tool call must be a JSON object, got {type(data).__name__}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        return invalid('tool call has no "name" string')
    # Some models write "parameters"; a call without either takes no arguments.
    args = data.get("arguments", data.get("parameters", {}))
    if args is None:
        args = {}
    if isinstance(args, str):
        # Arguments double-encoded as a JSON string, OpenAI style.
        try:
            args = _loads(args) if args.strip() else {}
        except (ValueError, RecursionError) as exc:
            return invalid(f"arguments string is not valid JSON: {exc}", name)
        if (problem := _unsafe(args)) is not None:
            return invalid(problem, name)
    if not isinstance(args, dict):
        return invalid(f'"arguments" must be a JSON object, got {type(args).__name__}', name)
    if declared is not None and name not in declared:
        listed = ", ".join(sorted(declared)) or "none"
        return ToolCall(
            name=name, arguments=args, raw=raw, valid=False,
            error=f"tool {name!r} was not declared (declared tools: {listed})",
        )  # fmt: skip
    return ToolCall(name=name, arguments=args, raw=raw)


def tool_names(tools: Iterable[str | Mapping[str, Any]]) -> frozenset[str]:
    """The names of declared tools: given as names, or as OpenAI function schemas
    (``{"type": "function", "function": {"name": ...}}`` or the bare function dict)."""
    names = set()
    for tool in tools:
        if isinstance(tool, Mapping):
            function = tool.get("function")
            tool = (function if isinstance(function, Mapping) else tool).get("name")
        if isinstance(tool, str) and tool:
            names.add(tool)
    return frozenset(names)


def _held_back(text: str) -> int:
    """Length of the longest tail of ``text`` that starts ``<tool_call>``."""
    for n in range(min(len(text), len(TOOL_CALL_START) - 1), 0, -1):
        if TOOL_CALL_START.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Incremental splitter of generated text into shown text and tool calls.

    Usage::

        parser = ToolCallParser(tools=tools)   # tools: the declared ones, or None
        for piece in pieces:
            text, calls = parser.feed(piece)
            ...
        text, calls = parser.finish()

    tools: the tools the model was offered (names or OpenAI function schemas).
    A call to any other name comes back invalid. None (the default) checks no
    names; an empty list declares none, so every call is invalid.
    """

    def __init__(self, tools: Iterable[str | Mapping[str, Any]] | None = None) -> None:
        self._declared = None if tools is None else tool_names(tools)
        self._buffer = ""  # undecided text: a held-back tail, or an open call's body
        self._in_call = False
        self._scan_from = 0  # where to resume looking for </tool_call> in an open call

    @property
    def in_tool_call(self) -> bool:
        """True while a ``<tool_call>`` has opened and not yet closed."""
        return self._in_call

    def feed(self, piece: str) -> ParseUpdate:
        """Add generated text; return what can be shown now and calls that completed."""
        self._buffer += piece
        shown: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._in_call:
                end = self._buffer.find(TOOL_CALL_END, self._scan_from)
                if end < 0:
                    # Only a tag cut at the buffer's end can complete later.
                    self._scan_from = max(0, len(self._buffer) - len(TOOL_CALL_END) + 1)
                    break
                body = self._buffer[:end]
                raw = TOOL_CALL_START + body + TOOL_CALL_END
                calls.append(_decode_call(body, raw, self._declared))
                self._buffer = self._buffer[end + len(TOOL_CALL_END) :]
                self._in_call = False
                continue
            start = self._buffer.find(TOOL_CALL_START)
            if start < 0:
                keep = _held_back(self._buffer)
                shown.append(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                break
            shown.append(self._buffer[:start])
            self._buffer = self._buffer[start + len(TOOL_CALL_START) :]
            self._in_call = True
            self._scan_from = 0
        return ParseUpdate("".join(shown), calls)

    def finish(self) -> ParseUpdate:
        """End of generation: release held-back text; an open call becomes invalid."""
        buffer, in_call = self._buffer, self._in_call
        self._buffer, self._in_call, self._scan_from = "", False, 0
        if not in_call:
            return ParseUpdate(buffer, [])
        raw = TOOL_CALL_START + buffer
        # Keep whatever name/arguments the JSON got to, to help the caller report it.
        partial = _decode_call(buffer, raw, self._declared)
        call = ToolCall(
            name=partial.name,
            arguments=partial.arguments,
            raw=raw,
            valid=False,
            error="unterminated tool call: generation ended before </tool_call>",
        )
        return ParseUpdate("", [call])


def parse_tool_calls(
    text: str, tools: Iterable[str | Mapping[str, Any]] | None = None
) -> tuple[str, list[ToolCall]]:
    """Split finished output into its plain text and its tool calls.

    The text is everything outside the calls, unchanged (strip it if you want).
    tools: the declared tools, as for :class:`ToolCallParser`.
    """
    parser = ToolCallParser(tools)
    shown, calls = parser.feed(text)
    rest, more = parser.finish()
    return shown + rest, calls + more
