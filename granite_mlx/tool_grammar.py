"""Tool calls as a grammar: Granite's call markup, a declared name, arguments valid for it.

Granite's chat template asks for calls as (and renders past calls as)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Boston"}}
    </tool_call>

one call per block, several blocks separated by a newline, where
``<tool_call>`` and ``</tool_call>`` are single tokens (100270, 100271). The
grammar below writes exactly that text, with the name chosen among the declared
tools and the arguments as JSON valid against that tool's ``parameters``
schema (written compactly, `constrain.JSON_OPTIONS`). Per ``tool_choice``:

    "required"        start: calls                    one or more calls, then the end
    {"function": f}   start: call_f                   exactly one call of f
    "auto"            start: TEXT? calls?             text, then optionally calls
                      start: answer | calls           (with a response_format: its rule)
    "none"            start: TEXT                     no call possible
    None              no grammar: the model's free choice

``TEXT`` is any text that does not contain ``<tool_call>``: the special token
is not text (llguidance keeps special tokens out of every regex), and the same
characters spelled out by ordinary tokens are excluded too, so the tool-call
parser never sees a call the grammar did not check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .constrain import ConstraintError, _json_rule

__all__ = ["tool_call_grammar", "tool_schemas"]

TOOL_CHOICES = ("none", "auto", "required")

# Any text without the characters "<tool_call>" (special tokens never match a regex).
_TEXT = r"TEXT: /(?s:.+)/ & ~/(?s:.*)<tool_call>(?s:.*)/"

# A function without "parameters" takes none: its arguments are {}.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def tool_schemas(tools: Sequence[Mapping[str, Any]] | None) -> list[tuple[str, str]]:
    """(name, Lark rule for its arguments) of each tool, checked; accepts the OpenAI
    ``{"type": "function", "function": {...}}`` form or the inner dict."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ConstraintError(
            f"tools must be a list of function schemas, not {type(tools).__name__}."
        )
    out: list[tuple[str, str]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ConstraintError(
                f"tools[{i}] is a {type(tool).__name__}; each tool must be a dict "
                '{"type": "function", "function": {"name": ..., "parameters": {...}}}.'
            )
        spec = tool.get("function", tool)
        if not isinstance(spec, Mapping):
            raise ConstraintError(f'tools[{i}]["function"] must be a dict with a "name".')
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ConstraintError(f'tools[{i}] has no "name"; every function needs one.')
        params = spec.get("parameters")
        if params is None:
            params = _NO_PARAMETERS
        elif not isinstance(params, Mapping):
            raise ConstraintError(
                f"tools[{i}] ({name!r}): parameters must be a JSON Schema object, "
                f"not {type(params).__name__}."
            )
        if any(name == seen for seen, _ in out):
            raise ConstraintError(f"tools[{i}]: the name {name!r} is declared twice.")
        out.append((name, _json_rule(params, f"tools[{i}] ({name!r}) parameters")))
    return out


def _chosen_name(tool_choice: Mapping, names: list[str]) -> str:
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ConstraintError(
            'A named tool_choice is {"type": "function", "function": {"name": "<tool name>"}}; '
            f"got {tool_choice!r}."
        )
    if name not in names:
        declared = ", ".join(repr(n) for n in names) or "none"
        raise ConstraintError(
            f"tool_choice names {name!r}, which is not among the tools (declared: {declared})."
        )
    return name


def _lit(text: str) -> str:
    """A Lark string literal for ``text`` (JSON escapes are Lark escapes)."""
    return json.dumps(text)


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: Any,
    answer_rule: str | None = None,
    answer_grammar: str | None = None,
    parallel: bool = True,
) -> tuple[str, str] | None:
    """(Lark grammar, description) for ``tool_choice``, or None when tools constrain nothing.

    ``answer_rule``: what a text answer must be instead of free text (the
    response_format's JSON Schema or regex rule). ``answer_grammar``: a user's
    whole Lark grammar, which only combines with no tool choice or "none".
    """
    if tool_choice is None:
        return None
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ConstraintError(
                f"tool_choice {tool_choice!r} is not known: use None, 'none', 'auto', "
                "'required' or {'type': 'function', 'function': {'name': ...}}."
            )
    elif not isinstance(tool_choice, Mapping):
        raise ConstraintError(
            f"tool_choice must be a string or a dict, not {type(tool_choice).__name__}."
        )
    schemas = tool_schemas(tools)
    names = [name for name, _ in schemas]
    if tool_choice == "none" or (tool_choice == "auto" and not schemas):
        if answer_rule is not None or answer_grammar is not None:
            return None  # the answer's own grammar: no special token fits it
        if tool_choice == "auto":
            return None  # nothing to call: free text
        return f"start: TEXT?\n{_TEXT}\n", "tool_choice 'none' (no tool call)"
    if not schemas:
        raise ConstraintError(
            f"tool_choice={tool_choice!r} needs tools: pass tools=[...] with the functions "
            "the model may call."
        )
    if isinstance(tool_choice, Mapping):
        chosen = [_chosen_name(tool_choice, names)]
        start, what = "start: call", f"a call of {chosen[0]!r}"
    else:
        chosen = names
        if tool_choice == "required":
            start, what = "start: calls", "tool_choice 'required'"
        elif answer_grammar is not None:
            raise ConstraintError(
                "A Lark grammar cannot be combined with tool_choice='auto': add the tool "
                "calls to the grammar, or use tool_choice 'none' or 'required'."
            )
        elif answer_rule is not None:
            start, what = "start: answer | calls\nanswer: " + answer_rule, "the answer or a call"
        else:
            start, what = f"start: TEXT? calls?\n{_TEXT}", "text or tool calls"
    lines = [
        start,
        'calls: call ("\\n" call)*' if parallel else "calls: call",
        'call: <tool_call> "\\n{\\"name\\": " function "}\\n" </tool_call>',
        "function: " + " | ".join(f"f{i}" for i in range(len(chosen))),
    ]
    parameters = dict(schemas)
    for i, name in enumerate(chosen):
        head = json.dumps(name, ensure_ascii=False) + ', "arguments": '
        lines.append(f"f{i}: {_lit(head)} a{i}")
        lines.append(f"a{i}: {parameters[name]}")
    return "\n".join(lines) + "\n", what
