"""Turn a conversation into a Granite 4.0 prompt.

Two renderers give the same text:

* a checkpoint's own Jinja template, rendered in a sandbox set up like
  transformers' ``apply_chat_template`` (same filters, globals and options), and
* a built-in Python renderer of the official Granite 4.0 template, used when a
  checkpoint ships no template. It is byte-identical to the official template
  on every conversation the template accepts (checked against transformers).

Messages are OpenAI-style dicts: ``{"role": ..., "content": ...}`` with roles
system/user/assistant/tool; assistant messages may carry ``tool_calls``
(``{"type": "function", "function": {"name", "arguments"}}``, arguments a dict
or a JSON string). Content may also be a list of ``{"type": "text", "text"}``
parts. Text that cannot be encoded (a lone surrogate) is refused here, naming
the message, before it can reach the tokenizer or a saved session.

A checkpoint's template is untrusted code. Whatever it raises becomes a
ChatFormatError, and it is bounded: it runs on a worker thread that is stopped
after TEMPLATE_SECONDS, its output is cut off past TEMPLATE_MAX_CHARS, and the
operations that could build a huge value in one step (``*``, ``**``, a filter or
method given a huge count such as ``center(10**9)``) refuse operands past
_MAX_OPERAND.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from granite_mlx.errors import GraniteError
from granite_mlx.surrogates import describe_surrogate, surrogate_at

__all__ = [
    "DEFAULT_SYSTEM_MESSAGE",
    "ChatFormatError",
    "checkpoint_template",
    "encode_prompt",
    "message_boundaries",
    "render_chat",
    "render_prompt",
    "snapshot_points",
]

Message = Mapping[str, Any]

TEMPLATE_SECONDS = 10.0  # a checkpoint's template that runs longer is stopped
TEMPLATE_MAX_CHARS = 16_000_000  # ... or that writes more (128K tokens are ~0.5M chars)
_MAX_OPERAND = 1_000_000  # repetition counts, lengths and integer bits inside a template

DEFAULT_SYSTEM_MESSAGE = (
    "You are a helpful assistant. Please ensure responses are professional, accurate, and safe."
)
_TOOLS_PREFIX = (
    "You are a helpful assistant with access to the following tools. You may call one or more "
    "tools to assist with the user query.\n\nYou are provided with function signatures within "
    "<tools></tools> XML tags:\n<tools>"
)
_TOOLS_SUFFIX = (
    "\n</tools>\n\nFor each tool call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>. '
    "If a tool does not exist in the provided list of tools, notify the user that you do not "
    "have the ability to fulfill the request."
)
_DOCUMENTS_PREFIX = (
    "You are a helpful assistant with access to the following documents. You may use one or "
    "more documents to assist with the user query.\n\nYou are given a list of documents within "
    "<documents></documents> XML tags:\n<documents>"
)
_DOCUMENTS_SUFFIX = (
    "\n</documents>\n\nWrite the response to the user's input by strictly aligning with the "
    "facts in the provided documents. If the information needed to answer the question is not "
    "available in the documents, inform the user that the question cannot be answered based on "
    "the available data."
)
_START, _END_ROLE, _EOT = "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"
_ROLES = ("system", "user", "assistant", "tool")

# Older names for a message's reasoning; transformers copies them to both of
# the names templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatFormatError(GraniteError, ValueError):
    """The conversation (or the chat template) cannot be turned into a prompt."""


# --------------------------------------------------------------------------
# Input clean-up shared by both renderers
# --------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """Rebuild ``value`` from JSON types only.

    Templates come from the Hub and are untrusted: they must never see objects
    whose methods could do harm, so (like transformers) we hand them copies.
    Text that UTF-8 cannot encode is refused.
    """
    if isinstance(value, str):
        if (i := surrogate_at(value)) is not None:
            raise ChatFormatError(
                f"{where} contains text that is not valid Unicode ({describe_surrogate(value, i)}"
                "). Decode the text as UTF-8 (with errors='replace' if it is damaged)."
            )
        # str subclasses (enums) lose their extra methods
        return value if type(value) is str else str.__str__(value)
    if value is None or type(value) in (int, float, bool):
        return value
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), where) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump(), where)
    if callable(getattr(value, "item", None)):  # numpy / mlx scalars
        try:
            return _plain(value.item(), where)
        except (TypeError, ValueError):  # an array of several values
            pass
    raise ChatFormatError(
        f"{where} contains a {type(value).__name__}, which a chat template cannot use. "
        "Pass only strings, numbers, booleans, None, lists and dicts."
    )


def _prepare_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Copy the messages as plain dicts, dropping None values like transformers does.

    (OpenAI clients send ``content: null`` beside ``tool_calls``; templates expect
    the key to be absent.)
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatFormatError(
            "messages must be a list of dicts like {'role': 'user', 'content': 'Hi'}, "
            f"not {type(messages).__name__}."
        )
    if not messages:
        raise ChatFormatError("The conversation is empty. Pass at least one message.")
    out = []
    for i, message in enumerate(messages):
        message = _plain(message, f"messages[{i}]")
        if not isinstance(message, dict):
            raise ChatFormatError(
                f"messages[{i}] is a {type(message).__name__}; each message must be a dict "
                "like {'role': 'user', 'content': 'Hi'}."
            )
        if not isinstance(message.get("role"), str):
            raise ChatFormatError(
                f"messages[{i}] has no 'role' string. Give it one of: {', '.join(_ROLES)}."
            )
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _prepare_list(items: Any, what: str) -> list[dict[str, Any]] | None:
    """Tools and documents: None, or a list of JSON objects."""
    if items is None:
        return None
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise ChatFormatError(f"{what} must be a list of dicts, not {type(items).__name__}.")
    out = []
    for i, item in enumerate(items):
        item = _plain(item, f"{what}[{i}]")
        if not isinstance(item, dict):
            raise ChatFormatError(
                f"{what}[{i}] is a {type(item).__name__}; each entry must be a dict "
                + (
                    "(an OpenAI function schema)."
                    if what == "tools"
                    else "(for example {'title': ..., 'text': ...})."
                )
            )
        out.append(item)
    return out


# --------------------------------------------------------------------------
# Jinja: a checkpoint's own template
# --------------------------------------------------------------------------


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """``tojson`` as transformers defines it: plain json.dumps, no HTML escaping."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    """Templates call this to reject a conversation."""
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictFactory:
    """``dict(...)`` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore names (a route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # First parameter unnamed, like Jinja's own: namespace(self=...) must still work.
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore attributes on a namespace ({name!r})"
            )


class _GenerationBlock(Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (used by transformers to
    mark assistant tokens for training masks) and render its body unchanged."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _refuse_huge(values: Any) -> None:
    """No count, width or length past _MAX_OPERAND reaches a template operation."""
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_OPERAND:
            raise jinja2.exceptions.SecurityError(
                f"the chat template asked for a count of {value}, above the limit {_MAX_OPERAND}"
            )


def _size(value: Any) -> int:
    """What a value weighs for the limits: characters, items or integer bits."""
    if isinstance(value, (str, list, tuple)):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value).bit_length()
    return 0


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with no single step that builds a huge value."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        big = 0  # about how many characters, items or bits the result would have
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            seq, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                big = len(seq) * count
            elif ints:
                big = _size(left) + _size(right)
        elif ints and abs(left) > 1:  # "**": bits(left) * right bits
            big = _size(left) * right
        if big > _MAX_OPERAND:
            raise jinja2.exceptions.SecurityError(
                f"the chat template's {operator!r} would build a value of about {big} "
                f"characters, items or bits, above the limit {_MAX_OPERAND}"
            )
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _refuse_huge((*args, *kwargs.values()))
        return super().call(__context, __obj, *args, **kwargs)


def _bounded_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` refusing huge counts among its arguments (not its input value)."""
    passed = getattr(function, "jinja_pass_arg", None)  # set by @pass_context & co.
    skip = 2 if passed is not None else 1  # the context, then the filtered value

    def bounded(*args: Any, **kwargs: Any) -> Any:
        _refuse_huge((*args[skip:], *kwargs.values()))
        return function(*args, **kwargs)

    if passed is not None:
        bounded.jinja_pass_arg = passed  # type: ignore[attr-defined]
    return bounded


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, loopcontrols],
    )
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatFormatError(
            f"The chat template is not valid Jinja (line {exc.lineno}: {exc.message}). "
            "Fix chat_template.jinja, or remove it to use the built-in Granite format."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - e.g. RecursionError on absurdly nested source
        raise ChatFormatError(
            f"The chat template could not be compiled ({type(exc).__name__}: {exc}). "
            "Fix chat_template.jinja, or remove it to use the built-in Granite format."
        ) from exc


class _Stopped(SystemExit):
    """Raised inside a template render that ran out of time. A SystemExit, so that
    should it land after the render ended, the worker thread ends silently."""


class _TooLongError(Exception):
    pass


def _render_bounded(compiled: jinja2.Template, variables: dict[str, Any]) -> str:
    """compiled.render(**variables) on a worker thread, stopped after
    TEMPLATE_SECONDS and cut off past TEMPLATE_MAX_CHARS of output.

    A pure-Python loop cannot be interrupted from outside except by an
    asynchronous exception; the worker exists so that one never lands in the
    caller's code.
    """
    box: dict[str, Any] = {}
    lock = threading.Lock()

    def run() -> None:
        try:
            try:
                parts, size = [], 0
                for piece in compiled.generate(**variables):
                    size += len(piece)
                    if size > TEMPLATE_MAX_CHARS:
                        raise _TooLongError
                    parts.append(piece)
                box["text"] = "".join(parts)
            finally:
                with lock:
                    box["done"] = True
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    worker = threading.Thread(target=run, name="granite-mlx chat template", daemon=True)
    worker.start()
    worker.join(TEMPLATE_SECONDS)
    with lock:
        if not box.get("done"):
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(worker.ident), ctypes.py_object(_Stopped)
            )
            raise ChatFormatError(
                f"The chat template ran for more than {TEMPLATE_SECONDS:g} s and was stopped "
                "(a runaway loop?). Fix chat_template.jinja, or remove it to use the built-in "
                "Granite format."
            )
    if "error" in box:
        raise box["error"]
    return box["text"]


def _render_template(
    template: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    documents: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    template_kwargs: dict[str, Any],
) -> str:
    compiled = _compile(template)
    variables = {
        **template_kwargs,
        "messages": messages,
        "tools": tools,
        "documents": documents,
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return _render_bounded(compiled, variables)
    except ChatFormatError:
        raise
    except _TooLongError:
        raise ChatFormatError(
            f"The chat template wrote more than {TEMPLATE_MAX_CHARS} characters and was "
            "stopped (a runaway loop?). Fix chat_template.jinja, or remove it to use the "
            "built-in Granite format."
        ) from None
    except jinja2.exceptions.SecurityError as exc:
        raise ChatFormatError(
            f"The chat template tried an unsafe operation and was stopped: {exc}"
        ) from exc
    except jinja2.TemplateError as exc:
        # raise_exception(...) lands here: the template's own words about the conversation.
        raise ChatFormatError(f"The chat template rejected the conversation: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - untrusted code: whatever it raises
        # E.g. a tool call without arguments reaching `tojson`, `'a' + 1`, `1 / 0`,
        # `10.0 ** 400`, a macro that calls itself forever.
        raise ChatFormatError(
            f"The chat template failed on this conversation ({type(exc).__name__}: {exc}). "
            "Check the messages against the template's expected fields."
        ) from exc


# --------------------------------------------------------------------------
# Built-in Granite 4.0 renderer
# --------------------------------------------------------------------------


def _text_of(content: Any, where: str) -> str:
    """A message's text: the string, or its text parts joined by newlines.

    Non-text parts (images, ...) are skipped, as the official template does.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatFormatError(
            f"{where} content is a {type(content).__name__}; use a string or a list of "
            "{'type': 'text', 'text': ...} parts (json.dumps tool results first)."
        )
    text = ""
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            piece = part.get("text")
            if not isinstance(piece, str):
                raise ChatFormatError(f"{where} has a text part without a 'text' string.")
            # Separator only once some text exists, exactly like the template.
            text = text + "\n" + piece if text != "" else text + piece
    return text


def _render_tool_call(call: Any, where: str) -> str:
    if not isinstance(call, dict):
        raise ChatFormatError(
            f"{where} is a {type(call).__name__}; expected "
            "{'type': 'function', 'function': {'name': ..., 'arguments': ...}}."
        )
    if call.get("function"):
        call = call["function"]
        if not isinstance(call, dict):
            raise ChatFormatError(f"{where} 'function' must be a dict with name and arguments.")
    if "arguments" not in call:
        raise ChatFormatError(
            f"{where} has no 'arguments'. Pass a dict or a JSON string ('{{}}' for none)."
        )
    name = call.get("name")
    args = call["arguments"]
    # A missing name prints as nothing in Jinja, None as "None".
    name_text = "" if "name" not in call else str(name)
    args_text = args if isinstance(args, str) else _tojson(args)
    return (
        '<tool_call>\n{"name": "' + name_text + '", "arguments": ' + args_text + "}\n</tool_call>"
    )


def _system_text(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    documents: list[dict[str, Any]] | None,
) -> str:
    tools_text = ""
    if tools:
        tools_text = _TOOLS_PREFIX + "".join("\n" + _tojson(t) for t in tools) + _TOOLS_SUFFIX
    docs_text = ""
    if documents:
        docs_text = (
            _DOCUMENTS_PREFIX + "".join("\n" + _tojson(d) for d in documents) + _DOCUMENTS_SUFFIX
        )
    extra = "\n\n".join(t for t in (tools_text, docs_text) if t)

    if messages[0]["role"] == "system":
        system = _text_of(messages[0].get("content"), "messages[0]")
        if extra:
            system = system + "\n\n" + extra
    else:
        system = extra
    # An empty system message (even an explicit one) gets the default text.
    return system or DEFAULT_SYSTEM_MESSAGE


def _render_builtin(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    documents: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    template_kwargs: dict[str, Any],
) -> str:
    # The official template lets `available_tools` stand in for `tools`.
    available = template_kwargs.get("available_tools")
    if available:
        tools = _prepare_list(available, "available_tools")

    for i, message in enumerate(messages):
        if message["role"] not in _ROLES:
            # The official template silently drops such messages; tell the user instead.
            raise ChatFormatError(
                f"messages[{i}] has role {message['role']!r}; Granite knows "
                f"{', '.join(_ROLES)}. Rename the role or drop the message."
            )

    out = [_START + "system" + _END_ROLE + _system_text(messages, tools, documents) + _EOT + "\n"]
    last = len(messages) - 1
    for i, message in enumerate(messages):
        role = message["role"]
        where = f"messages[{i}]"
        text = _text_of(message.get("content"), where)
        if role == "user" or (role == "system" and i > 0):
            out.append(_START + role + _END_ROLE + text + _EOT + "\n")
        elif role == "assistant":
            out.append(_START + "assistant" + _END_ROLE + text)
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ChatFormatError(f"{where} tool_calls must be a list.")
            for j, call in enumerate(calls):
                if j > 0 or text:
                    out.append("\n")
                out.append(_render_tool_call(call, f"{where}.tool_calls[{j}]"))
            out.append(_EOT + "\n")
        elif role == "tool":
            # Consecutive tool results share one user turn.
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.append(_START + "user" + _END_ROLE)
            out.append("\n<tool_response>\n" + text + "\n</tool_response>")
            if i == last or messages[i + 1]["role"] != "tool":
                out.append(_EOT + "\n")
    if add_generation_prompt:
        out.append(_START + "assistant" + _END_ROLE)
    return "".join(out)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def render_chat(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    template: str | None = None,
    **template_kwargs: Any,
) -> str:
    """Render a conversation as prompt text.

    Args:
        messages: OpenAI-style message dicts (roles system/user/assistant/tool).
        tools: function schemas, ``{"type": "function", "function": {...}}`` or
            the bare function dict; listed verbatim in the system turn.
        documents: dicts (e.g. ``{"title": ..., "text": ...}``) for RAG.
        add_generation_prompt: end with the assistant header so the model answers.
        template: a checkpoint's Jinja chat template; None uses the built-in
            Granite 4.0 renderer.
        **template_kwargs: extra template variables (``available_tools``,
            ``bos_token``, ...), as transformers passes them.

    Raises:
        ChatFormatError: malformed messages/tools/documents, or a template error.
    """
    prepared = _prepare_messages(messages)
    tool_list = _prepare_list(tools, "tools")
    doc_list = _prepare_list(documents, "documents")
    extra = _plain(template_kwargs, "template keyword arguments")
    if template is None:
        return _render_builtin(prepared, tool_list, doc_list, add_generation_prompt, extra)
    return _render_template(template, prepared, tool_list, doc_list, add_generation_prompt, extra)


def checkpoint_template(tokenizer: Any, tools: Sequence[Any] | None = None) -> str | None:
    """The chat template a tokenizer (or mlx-lm ``TokenizerWrapper``) carries, if any.

    Some tokenizers hold several named templates; like transformers, pick
    ``tool_use`` when tools are given and it exists, else ``default``.
    """
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        if tools and "tool_use" in template:
            template = template["tool_use"]
        else:
            template = template.get("default")
    return template if isinstance(template, str) and template else None


def render_prompt(
    tokenizer: Any,
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """Prompt text for ``tokenizer``'s checkpoint: its own template when it has one,
    the built-in Granite 4.0 format otherwise.

    As in transformers, the tokenizer's special tokens (``bos_token``,
    ``eos_token``, ...) are template variables unless overridden.
    """
    template = checkpoint_template(tokenizer, tools)
    specials = {
        # transformers 4 may hold AddedToken objects here; templates want strings.
        k: v if isinstance(v, (str, list)) else str(v)
        for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()
    }
    return render_chat(
        messages,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        template=template,
        **{**specials, **template_kwargs},
    )


def encode_prompt(
    tokenizer: Any,
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> list[int]:
    """Token ids of :func:`render_prompt`'s text.

    The template writes every special token itself (a BOS included, if the
    format has one), so encoding adds none: no doubled BOS.
    """
    text = render_prompt(
        tokenizer,
        messages,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def message_boundaries(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Positions in a rendered conversation where a message ends (after its
    ``<|end_of_text|>`` and the newline that follows): where a later request
    sharing the conversation so far can resume (granite_mlx.prompt_cache)."""
    eot = tokenizer.convert_tokens_to_ids(_EOT)
    if not isinstance(eot, int) or eot < 0:
        return []
    newline = tokenizer.encode("\n", add_special_tokens=False)
    out = []
    for i, t in enumerate(ids):
        if t == eot:
            end = i + 1 + (len(newline) if list(ids[i + 1 : i + 1 + len(newline)]) == newline else 0)
            if end < len(ids):
                out.append(end)
    return out


# The generation prompt after the last message ("<|start_of_role|>assistant<|end_of_role|>"
# is 3 tokens); a boundary this close to the end is left out (see snapshot_points).
_GENERATION_PROMPT_TOKENS = 8


def snapshot_points(tokenizer: Any, ids: Sequence[int], extra: Sequence[int] = ()) -> list[int]:
    """Where the engine should snapshot this prompt, besides what it keeps by itself
    (the prompt's end, for a regenerate, and the answer's end, for the next turn).

    Of the message boundaries, two serve what clients send next: the end of the
    system turn (a new chat over the same system prompt or document) and the end of
    the message before the last (an edited last question, a rewritten tool result).
    Each snapshot in the part of the prompt still to prefill costs a prefill chunk
    of its own (on a CPU about one decode step), so the others are left out: the
    last message's end is only the generation prompt away from the prompt's end,
    and the earlier ones were snapshotted by the earlier requests of the
    conversation (a prefix the prompt cache holds costs nothing again).
    """
    bounds = message_boundaries(tokenizer, ids)
    if bounds and len(ids) - bounds[-1] <= _GENERATION_PROMPT_TOKENS:
        bounds = bounds[:-1]
    return sorted({*bounds[:1], *bounds[-1:], *extra})
