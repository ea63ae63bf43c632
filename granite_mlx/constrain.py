"""Structured output: every token sampled from the logits masked to what a grammar allows.

A *constraint* answers one question before each token: which token ids may come
next? The engine asks it while the device computes the step's logits (so on a
GPU the question costs no wall time), sets every other logit to -inf, samples,
and tells the constraint which token was taken:

    mask = constraint.mask()              host, while the model step runs
    logits = where(mask, logits, -inf)    device
    token = sample(logits)
    constraint.advance(token)
    constraint.is_finished()              nothing may follow: the answer ends ("stop")

What can be asked for (`build_constraint`):

* ``response_format`` in OpenAI's shape: ``{"type": "text"}`` (no constraint),
  ``{"type": "json_object"}`` (any JSON object), ``{"type": "json_schema",
  "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``; or, in
  Python, a pydantic model class, a plain JSON Schema dict, `Regex` or `Grammar`
  (Lark syntax, as llguidance reads it), or a ready `Constraint`.
* ``tool_choice`` with ``tools`` (see `tool_grammar`): ``"required"`` or a named
  function forces Granite's own call markup with a declared name and arguments
  valid against that tool's ``parameters`` schema; ``"auto"`` lets the model
  answer in text or call, constrained once ``<tool_call>`` is out; ``"none"``
  forbids calls. Without ``tool_choice`` nothing is constrained (the model's
  free choice, as before).

Every schema, grammar or option is compiled when the request is made: a bad one
raises `ConstraintError` (a `GenerationError`) naming the problem, never
mid-stream.

The grammar engine is llguidance, chosen by measurement against xgrammar and
outlines-core on the real Granite tokenizer (100352 ids; `python
benchmarks/grammar_engines.py`, benchmarks/results/grammar_engines_cpu.log; the
9 schemas of the tests, this 2-core CPU; mask times in CPU time, medians over
schemas; "answer" = compile + every mask of one answer):

    engine                compile   mask: median / worst step   answer    keywords ignored
    llguidance 1.9.1      0.31 ms       13 us / 1.0 ms         0.63 ms   none
    xgrammar 0.2.9        3.7 ms         5 us / 0.25 ms        3.8 ms    multipleOf on numbers*
    outlines-core 0.2.14  167 ms       2.5 us / 0.12 ms        168 ms    integer/number bounds

(* by its own warning; the tests' invalid instances do not probe it.) Every
request may bring its own schema, so compiling is part of each answer:
llguidance constrains a whole answer 6x cheaper than xgrammar and 270x cheaper
than outlines-core, enforces every keyword tested, reads JSON Schema, regular
expressions and Lark grammars with special tokens and embedded JSON Schemas
(which is how tool calls are written, `tool_grammar`), and needs no torch
(xgrammar does). Its price: it computes masks lazily, so the first token of a
string with ``maxLength`` costs up to about 1 ms of CPU here (the other
engines pay that at compile time); most tokens cost 10-40 us.

With ``"strict": true``, and for pydantic models (which ignore extra keys
anyway), an object that does not say otherwise gets no properties beyond its
own, as OpenAI's strict mode requires of a schema.

JSON is written compactly in the style Granite's chat template uses
(``{"a": 1, "b": [2, 3]}``: ``", "`` and ``": "``, no other whitespace), so a
model cannot wander off into endless whitespace; a schema may override that
with llguidance's own ``"x-guidance"`` options.

The tokenizer bridge is built from the checkpoint's own tokenizer (the
tokenizer.json behind the loaded tokenizer, added tokens included: Granite's
``<tool_call>``/``</tool_call>`` are single tokens, and EOS is every id in the
tokenizer's ``eos_token_ids``), once per tokenizer (about 1 s).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import Constraint
from .errors import GenerationError

__all__ = [
    "JSON_OPTIONS",
    "Constraint",
    "ConstraintError",
    "Grammar",
    "GrammarConstraint",
    "Regex",
    "build_constraint",
    "grammar_tokenizer",
    "is_constraint",
    "response_format_rule",
]

#: How JSON is written unless a schema says otherwise ("x-guidance"): like
#: ``json.dumps`` and Granite's chat template, with no free whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Grammar errors can quote long lists (every special token); keep messages readable.
_MAX_ERROR = 600


class ConstraintError(GenerationError):
    """A response format, schema, grammar or tool choice that cannot be used."""


@dataclass(frozen=True)
class Regex:
    """The whole answer matches this regular expression (Rust ``regex`` syntax)."""

    pattern: str


@dataclass(frozen=True)
class Grammar:
    """The whole answer is a sentence of this Lark grammar (llguidance's dialect:
    ``start`` is the top rule, ``<tool_call>`` names a special token, ``%json {...}``
    embeds a JSON Schema)."""

    lark: str


# --------------------------------------------------------------------------
# The tokenizer bridge
# --------------------------------------------------------------------------

_bridges: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_bridge_lock = threading.Lock()


def _hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside an mlx-lm TokenizerWrapper (or itself)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def grammar_tokenizer(tokenizer: Any):
    """llguidance's view of ``tokenizer`` (an mlx-lm TokenizerWrapper or a fast HF
    tokenizer), built once per tokenizer and set of EOS ids, then cached."""
    import llguidance.hf

    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    key = tuple(eos)
    with _bridge_lock:
        per_eos = _bridges.setdefault(tokenizer, {})
        if key not in per_eos:
            try:
                per_eos[key] = llguidance.hf.from_tokenizer(_hf_tokenizer(tokenizer), eos_token=eos)
            except ValueError as exc:
                raise ConstraintError(
                    f"Structured output needs a fast (tokenizer.json) tokenizer: {exc}"
                ) from exc
        return per_eos[key]


# --------------------------------------------------------------------------
# The constraint
# --------------------------------------------------------------------------


def _short(message: str) -> str:
    message = message.strip()
    return message if len(message) <= _MAX_ERROR else message[:_MAX_ERROR] + " ..."


class GrammarConstraint:
    """A `Constraint` over one llguidance grammar (Lark text or llguidance JSON).

    ``mask()`` fills one preallocated uint32 buffer and returns it: read it
    before the next call. Compiling happens here, so a bad grammar raises
    `ConstraintError` when the request is built.
    """

    def __init__(self, tokenizer: Any, grammar: str, what: str = "the grammar"):
        import llguidance

        self.tokenizer = grammar_tokenizer(tokenizer)
        self.what = what
        self._matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise ConstraintError(f"Cannot use {what}: {_short(self._matcher.get_error())}")
        self.vocab_size = self.tokenizer.vocab_size
        self._words = np.zeros((self.vocab_size + 31) // 32, dtype=np.uint32)

    def mask(self) -> np.ndarray:
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        return self._words

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            # Only a caller that ignored the mask gets here.
            raise ConstraintError(
                f"Token {token} does not fit {self.what}: {_short(self._matcher.get_error())}"
            )

    def is_finished(self) -> bool:
        return self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """The text so far is complete (EOS would be allowed now)."""
        return self._matcher.is_accepting()

    def allowed(self) -> np.ndarray:
        """The allowed token ids, for tests and debugging (computes a mask)."""
        bits = np.unpackbits(self.mask().view(np.uint8), bitorder="little")
        return np.flatnonzero(bits[: self.vocab_size])


# --------------------------------------------------------------------------
# response_format -> a Lark rule
# --------------------------------------------------------------------------

_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")


def _schema_of(response_format: Any) -> tuple[dict | None, str]:
    """(JSON Schema, description) for the JSON forms; (None, "") for the others."""
    if isinstance(response_format, type):
        schema_method = getattr(response_format, "model_json_schema", None)
        if schema_method is None:
            raise ConstraintError(
                f"response_format={response_format.__name__} is a class but not a pydantic "
                "model; pass a pydantic BaseModel subclass, a JSON Schema dict or an OpenAI "
                "response_format dict."
            )
        # pydantic ignores extra keys by default: generating them would only waste tokens.
        return _closed(schema_method()), f"the schema of {response_format.__name__}"
    if not isinstance(response_format, Mapping):
        return None, ""
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}, "response_format json_object"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise ConstraintError(
                'response_format {"type": "json_schema"} needs "json_schema": {"name": ..., '
                '"schema": {...}}; the "schema" object is missing.'
            )
        name = spec.get("name")
        schema = _closed(spec["schema"]) if spec.get("strict") else dict(spec["schema"])
        return schema, f"json_schema {name!r}" if name else "the json_schema"
    if kind in _FORMAT_TYPES:
        return None, ""
    if isinstance(kind, str) and kind not in _JSON_TYPES:
        raise ConstraintError(
            f"response_format type {kind!r} is not known: use one of {', '.join(_FORMAT_TYPES)}, "
            "or pass a JSON Schema dict."
        )
    return dict(response_format), "the JSON schema"  # a plain JSON Schema


_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

# Keywords whose value is a subschema, a list of them, or a name -> subschema map.
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions")


def _closed(schema: Any) -> Any:
    """A copy of ``schema`` where every object that does not say otherwise allows no
    properties beyond its own (what OpenAI's ``strict`` mode asks of a schema)."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _ONE:
        if key in out:
            out[key] = _closed(out[key])
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [_closed(s) for s in out[key]]
    for key in _MAP:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: _closed(s) for name, s in out[key].items()}
    is_object = out.get("type") == "object" or "properties" in out
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if is_object and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    return out


def _json_rule(schema: Mapping, what: str) -> str:
    """A Lark right-hand side for JSON valid against ``schema``, written compactly.

    The schema is compiled once alone here, so that an error names ``what``
    rather than a line of a larger grammar.
    """
    import llguidance

    schema = dict(schema)
    options = schema.get("x-guidance")
    schema["x-guidance"] = {**JSON_OPTIONS, **(options if isinstance(options, Mapping) else {})}
    try:
        text = json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"Cannot use {what}: it is not plain JSON ({exc}).") from exc
    grammar = llguidance.LLMatcher.grammar_from_json_schema(text)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ConstraintError(f"Cannot use {what}: {_short(messages[0])}")
    return "%json " + text


def response_format_rule(response_format: Any) -> tuple[str | None, str, str | None]:
    """What ``response_format`` asks for, as (Lark rule body, description, whole grammar).

    The rule body (JSON Schema or regex) can be combined with tool calls;
    a user's Lark grammar comes back as the whole grammar instead (its own
    ``start``), with no rule body. (None, "", None) means no constraint.
    """
    if response_format is None:
        return None, "", None
    if isinstance(response_format, Regex):
        return _regex_rule(response_format.pattern), f"the regex {response_format.pattern!r}", None
    if isinstance(response_format, Grammar):
        return None, "the grammar", _check_lark(response_format.lark)
    if isinstance(response_format, str):
        raise ConstraintError(
            f"response_format={response_format!r} is a string; pass a dict such as "
            '{"type": "json_object"}, a JSON Schema dict, a pydantic model, '
            "granite_mlx.constrain.Regex(...) or Grammar(...)."
        )
    schema, what = _schema_of(response_format)
    if schema is not None:
        return _json_rule(schema, what), what, None
    if not isinstance(response_format, Mapping):
        raise ConstraintError(
            f"response_format has type {type(response_format).__name__}; pass a dict, a "
            "pydantic model class, Regex(...), Grammar(...) or a Constraint."
        )
    kind = response_format["type"]
    if kind == "text":
        return None, "", None
    if kind == "regex":
        pattern = response_format.get("regex", response_format.get("pattern"))
        if not isinstance(pattern, str):
            raise ConstraintError('response_format {"type": "regex"} needs "regex": "<pattern>".')
        return _regex_rule(pattern), f"the regex {pattern!r}", None
    lark = response_format.get("grammar")
    if not isinstance(lark, str):
        raise ConstraintError(
            'response_format {"type": "grammar"} needs "grammar": "<Lark grammar text>".'
        )
    return None, "the grammar", _check_lark(lark)


def _regex_rule(pattern: str) -> str:
    import llguidance

    if not isinstance(pattern, str) or not pattern:
        raise ConstraintError("The regex is empty; give a pattern the answer must match.")
    return "/" + llguidance.regex_to_lark(pattern, "") + "/"


def _check_lark(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ConstraintError("The grammar is empty; give Lark text with a `start` rule.")
    return text


# --------------------------------------------------------------------------
# The public helper
# --------------------------------------------------------------------------


def is_constraint(value: Any) -> bool:
    """Whether ``value`` has the engine's `Constraint` methods."""
    return all(callable(getattr(value, m, None)) for m in ("mask", "advance", "is_finished"))


def build_constraint(
    tokenizer: Any,
    response_format: Any = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
    *,
    parallel_tool_calls: bool = True,
) -> Constraint | None:
    """The constraint for one answer, or None when nothing is constrained.

    Args:
        tokenizer: the checkpoint's tokenizer (``load_tokenizer``'s wrapper).
        response_format: see the module docstring; None or ``{"type": "text"}``
            for free text. A `Constraint` is returned as it is.
        tools: OpenAI function schemas (``{"type": "function", "function":
            {"name", "parameters", ...}}`` or the inner dict alone).
        tool_choice: None (no constraint from tools), ``"none"``, ``"auto"``,
            ``"required"`` or ``{"type": "function", "function": {"name": ...}}``.
            With a forced call the response_format does not apply.
        parallel_tool_calls: ``"required"`` and ``"auto"`` allow several calls in a
            row (Granite writes them one per line); False allows one.

    Raises:
        ConstraintError: a bad response_format, schema, regex, grammar, tool or
            tool_choice, with what is wrong in it.
    """
    from .tool_grammar import tool_call_grammar

    if is_constraint(response_format):
        if tool_choice not in (None, "none"):
            raise ConstraintError(
                "A ready Constraint cannot be combined with tool_choice; write the tool calls "
                "into it, or pass a schema instead."
            )
        return response_format
    rule, what, lark = response_format_rule(response_format)
    grammar = tool_call_grammar(
        tools, tool_choice, answer_rule=rule, answer_grammar=lark, parallel=parallel_tool_calls
    )
    if grammar is not None:
        text, what = grammar
    elif lark is not None:
        text = lark
    elif rule is not None:
        text = "start: " + rule
    else:
        return None
    return GrammarConstraint(tokenizer, text, what)
