"""granite_mlx.constrain and tool_grammar without a model: what each mask lets through.

Texts are tokenized canonically with the real Granite tokenizer and walked token by
token: each token must be in the mask computed before it (and the constraint then
advanced with it), the end of a complete text must allow EOS (or nothing more at
all), and a text the schema forbids must be refused at some token.
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
from conftest import FIXTURES
from structured_cases import SCHEMAS, TOOLS

from granite_mlx.constrain import (
    Constraint,
    ConstraintError,
    Grammar,
    GrammarConstraint,
    Regex,
    build_constraint,
    grammar_tokenizer,
)
from granite_mlx.generate import GenerationError
from granite_mlx.tokenizer import load_tokenizer

EOS = 100257
TOOL_CALL, TOOL_CALL_END = 100270, 100271


@cache
def tokenizer():
    return load_tokenizer(FIXTURES / "tokenizer")


def encode(text: str) -> list[int]:
    return tokenizer().encode(text, add_special_tokens=False)


def walk(constraint: Constraint, tokens: list[int]) -> int | None:
    """Feed ``tokens``; the index of the first one the mask refuses, or None."""
    for i, token in enumerate(tokens):
        if not allowed(constraint.mask(), token):
            return i
        constraint.advance(token)
    return None


def allowed(mask: np.ndarray, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


def complete(constraint: Constraint) -> bool:
    """The text so far may end here: nothing more may follow, or EOS is allowed."""
    return constraint.is_finished() or allowed(constraint.mask(), EOS)


def accepts(constraint: Constraint | None, text: str) -> bool:
    assert constraint is not None
    return walk(constraint, encode(text)) is None and complete(constraint)


def fmt(schema, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": strict}}


# --------------------------------------------------------------------------
# The tokenizer bridge
# --------------------------------------------------------------------------


def test_bridge_uses_the_checkpoints_tokenizer_with_its_special_tokens_and_is_cached():
    tok = tokenizer()
    bridge = grammar_tokenizer(tok)
    assert grammar_tokenizer(tok) is bridge  # built once per tokenizer
    assert bridge.vocab_size == len(tok._tokenizer) == 100352
    assert bridge.eos_tokens == [EOS]
    # Special and added tokens are single tokens, as the checkpoint defines them.
    for token, text in [(TOOL_CALL, b"<tool_call>"), (TOOL_CALL_END, b"</tool_call>")]:
        assert bridge.is_special_token(token) and bridge.decode_bytes([token]) == text
    assert bridge.tokenize_str('{"a": 1}') == encode('{"a": 1}')


def test_mask_is_a_preallocated_uint32_bitmask_of_the_tokenizers_vocabulary():
    c = build_constraint(tokenizer(), {"type": "json_object"})
    first = c.mask()
    assert first.dtype == np.uint32 and first.shape == ((100352 + 31) // 32,)
    assert c.mask() is first  # the same buffer, refilled
    # A JSON object starts with {" or {} and nothing else (compact JSON).
    assert {tokenizer().decode([t]) for t in c.allowed()} <= {"{", '{"', "{}"}


# --------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_accepts_a_valid_instance_and_refuses_an_invalid_one(name):
    schema, good, bad = SCHEMAS[name]
    assert accepts(build_constraint(tokenizer(), fmt(schema)), json.dumps(good))
    assert not accepts(build_constraint(tokenizer(), fmt(schema)), json.dumps(bad))


def test_finished_once_the_json_closes_and_eos_is_then_the_only_token():
    schema = SCHEMAS["flat"][0]
    c = build_constraint(tokenizer(), schema)  # a plain schema dict works too
    tokens = encode('{"name": "Ada", "age": 36}')
    assert walk(c, tokens[:-1]) is None
    assert not c.is_finished() and not allowed(c.mask(), EOS)
    assert walk(c, tokens[-1:]) is None
    assert c.is_finished()
    assert c.allowed().tolist() == [EOS]


def test_json_is_compact_unless_the_schema_asks_otherwise():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert accepts(build_constraint(tokenizer(), schema), '{"a": 1}')
    for text in ['{"a":1}', '{ "a": 1}', '{"a" : 1}', '{\n  "a": 1\n}']:
        assert not accepts(build_constraint(tokenizer(), schema), text), text
    loose = {**schema, "x-guidance": {"whitespace_flexible": True}}
    assert accepts(build_constraint(tokenizer(), loose), '{\n  "a": 1\n}')


def test_json_object_is_any_object():
    for text in ['{"a": [1, {"b": null}], "c": "d"}', "{}"]:
        assert accepts(build_constraint(tokenizer(), {"type": "json_object"}), text)
    for text in ["[1]", '"a"', "1"]:
        assert not accepts(build_constraint(tokenizer(), {"type": "json_object"}), text)


def test_pydantic_model():
    from pydantic import BaseModel, Field

    class Point(BaseModel):
        x: int = Field(ge=0, le=9)
        y: int

    class Segment(BaseModel):
        start: Point
        end: Point
        label: str | None = None

    good = Segment(start=Point(x=1, y=2), end=Point(x=3, y=-4), label="a")
    text = json.dumps(good.model_dump())  # json.dumps' style (model_dump_json has no spaces)
    assert accepts(build_constraint(tokenizer(), Segment), text)
    assert Segment.model_validate_json(text) == good
    bad = '{"start": {"x": 10, "y": 2}, "end": {"x": 3, "y": -4}}'
    assert not accepts(build_constraint(tokenizer(), Segment), bad)


def test_strict_schemas_and_pydantic_models_allow_no_extra_properties():
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"type": {"type": "integer"}}},
            "items": {"type": "array", "items": {"type": "object"}},
        },
    }
    text = '{"properties": {"type": 1}, "items": [{}]}'
    for extra in ['{"properties": {"type": 1, "x": 2}}', '{"items": [{"x": 2}]}', '{"x": 1}']:
        assert accepts(build_constraint(tokenizer(), fmt(schema, strict=False)), extra)
        assert not accepts(build_constraint(tokenizer(), fmt(schema)), extra), extra
    assert accepts(build_constraint(tokenizer(), fmt(schema)), text)  # names kept intact
    assert accepts(build_constraint(tokenizer(), schema), '{"x": 1}')  # a plain schema: as is

    from pydantic import BaseModel

    class Item(BaseModel):
        n: int

    assert not accepts(build_constraint(tokenizer(), Item), '{"n": 1, "m": 2}')
    assert accepts(build_constraint(tokenizer(), Item), '{"n": 1}')


def test_text_or_nothing_means_no_constraint():
    assert build_constraint(tokenizer()) is None
    assert build_constraint(tokenizer(), {"type": "text"}) is None
    assert build_constraint(tokenizer(), None, tools=TOOLS) is None  # no tool_choice: free


def test_a_ready_constraint_passes_through():
    c = GrammarConstraint(tokenizer(), 'start: "yes"')
    assert build_constraint(tokenizer(), c) is c


# --------------------------------------------------------------------------
# Regex and Lark
# --------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["object", "dict"])
def test_regex(form):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    fmt_ = Regex(pattern) if form == "object" else {"type": "regex", "regex": pattern}
    assert accepts(build_constraint(tokenizer(), fmt_), "123-abc")
    for text in ["12-abc", "123-a", "123-abcde", "123-ABC"]:
        assert not accepts(build_constraint(tokenizer(), fmt_), text), text


def test_lark_grammar_with_special_tokens_and_embedded_json():
    lark = """
start: "answer: " (YESNO | <tool_call> obj </tool_call>)
YESNO: "yes" | "no"
obj: %json {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
"""
    c = build_constraint(tokenizer(), Grammar(lark))
    assert accepts(c, "answer: no")
    c = build_constraint(tokenizer(), {"type": "grammar", "grammar": lark})
    assert walk(c, [*encode("answer: "), TOOL_CALL, *encode('{"n": 3}'), TOOL_CALL_END]) is None
    assert complete(c)
    assert not accepts(build_constraint(tokenizer(), Grammar(lark)), "answer: maybe")


# --------------------------------------------------------------------------
# Tool calls
# --------------------------------------------------------------------------


def call(name: str, arguments: dict) -> str:
    # Exactly how Granite's chat template renders a call (the HF tokenizer turns
    # <tool_call> in text into the single token, as the model writes it).
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


WEATHER = call("get_weather", {"city": "Boston", "unit": "celsius"})
ALARM = call("set_alarm", {"hour": 7, "minute": 30})
NOW = call("now", {})


def test_required_forces_a_call_of_a_declared_tool_with_valid_arguments():
    c = build_constraint(tokenizer(), tools=TOOLS, tool_choice="required")
    assert c.allowed().tolist() == [TOOL_CALL]  # the one special token, first
    for text in [WEATHER, ALARM, NOW, WEATHER + "\n" + NOW]:
        assert accepts(build_constraint(tokenizer(), tools=TOOLS, tool_choice="required"), text)
    for text in [
        "Sure.",
        call("get_time", {}),  # undeclared
        call("get_weather", {"city": "Boston"}),  # missing required unit
        call("set_alarm", {"hour": 24, "minute": 0}),  # out of bounds
        call("now", {"x": 1}),  # takes no arguments
        '<tool_call>\n{"name": "now", "arguments": "{}"}\n</tool_call>',  # escaped string
        '<tool_call>\n{"arguments": {}, "name": "now"}\n</tool_call>',  # template's key order
    ]:
        c = build_constraint(tokenizer(), tools=TOOLS, tool_choice="required")
        assert not accepts(c, text), text


def test_named_tool_choice_forces_that_tool_once():
    choice = {"type": "function", "function": {"name": "set_alarm"}}
    c = build_constraint(tokenizer(), tools=TOOLS, tool_choice=choice)
    assert walk(c, encode(ALARM)) is None and c.is_finished()  # then nothing, not even EOS
    for text in [WEATHER, ALARM + "\n" + ALARM]:
        assert not accepts(build_constraint(tokenizer(), tools=TOOLS, tool_choice=choice), text)


def test_parallel_calls_can_be_switched_off():
    c = build_constraint(
        tokenizer(), tools=TOOLS, tool_choice="required", parallel_tool_calls=False
    )
    assert walk(c, encode(NOW)) is None and c.is_finished()


def test_auto_allows_text_or_calls_and_checks_a_call_once_it_starts():
    def auto():
        return build_constraint(tokenizer(), tools=TOOLS, tool_choice="auto")

    for text in ["It is sunny.", WEATHER, "Let me look.\n" + WEATHER + "\n" + ALARM, ""]:
        assert accepts(auto(), text), text
    assert not accepts(auto(), "Let me look.\n" + call("get_time", {}))
    # "<tool_call>" spelled with ordinary tokens is not text: only the real call opens one.
    spelled = [27, 14506, 13735, 29]  # "<", "tool", "_call", ">"
    assert tokenizer().decode(spelled) == "<tool_call>"
    assert walk(auto(), spelled) == 3


def test_auto_with_a_response_format_answers_in_that_format_or_calls():
    def auto():
        schema = SCHEMAS["enum"][0]
        return build_constraint(tokenizer(), fmt(schema), tools=TOOLS, tool_choice="auto")

    assert accepts(auto(), '{"sentiment": "neutral", "confidence": "low"}')
    assert accepts(auto(), NOW)
    assert not accepts(auto(), "It is sunny.")


def test_none_forbids_calls():
    c = build_constraint(tokenizer(), tools=TOOLS, tool_choice="none")
    assert TOOL_CALL not in c.allowed()
    assert accepts(build_constraint(tokenizer(), tools=TOOLS, tool_choice="none"), "No call.")
    spelled = [27, 14506, 13735, 29]
    assert walk(build_constraint(tokenizer(), tools=TOOLS, tool_choice="none"), spelled) == 3
    # With a response format the format alone applies.
    c = build_constraint(tokenizer(), {"type": "json_object"}, tools=TOOLS, tool_choice="none")
    assert accepts(c, '{"a": 1}')


def test_tool_names_are_written_as_json():
    tools = [{"name": 'odd "name"\\x', "parameters": {"type": "object"}}]  # inner form
    c = build_constraint(tokenizer(), tools=tools, tool_choice="required")
    text = '<tool_call>\n{"name": "odd \\"name\\"\\\\x", "arguments": {}}\n</tool_call>'
    assert json.loads(text.split("\n")[1])["name"] == 'odd "name"\\x'
    assert accepts(c, text)
    # Other characters as they are, like the chat template writes them (not \u escapes).
    tools = [{"name": "météo_天气"}]
    text = '<tool_call>\n{"name": "météo_天气", "arguments": {}}\n</tool_call>'
    assert accepts(build_constraint(tokenizer(), tools=tools, tool_choice="required"), text)
    escaped = text.replace("é", "\\u00e9")
    assert not accepts(build_constraint(tokenizer(), tools=tools, tool_choice="required"), escaped)


# --------------------------------------------------------------------------
# Bad input: a clear error when the request is built
# --------------------------------------------------------------------------

BAD = [
    ({"response_format": fmt({"type": "objekt"})}, "json_schema 't'.*Invalid type: objekt"),
    ({"response_format": {"type": "json_schema"}}, '"schema" object is missing'),
    ({"response_format": fmt({"$ref": "#/$defs/nope"})}, "nope"),
    ({"response_format": {"type": "integer", "minimum": 5, "maximum": 1}}, "Unsatisfiable"),
    ({"response_format": {"type": "string", "pattern": "(unclosed"}}, "unclosed group"),
    ({"response_format": {"type": "xml"}}, "type 'xml' is not known"),
    ({"response_format": "json"}, "is a string"),
    ({"response_format": 3}, "has type int"),
    ({"response_format": int}, "not a pydantic model"),
    ({"response_format": fmt({"type": "number", "minimum": float("nan")})}, "not plain JSON"),
    ({"response_format": Regex("[a-")}, "unclosed character class"),
    ({"response_format": {"type": "regex"}}, 'needs "regex"'),
    ({"response_format": Regex("")}, "regex is empty"),
    ({"response_format": Grammar("start: foo")}, 'unknown name: "foo"'),
    ({"response_format": Grammar("start: <nope>")}, "unknown special token"),
    ({"response_format": {"type": "grammar"}}, 'needs "grammar"'),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice 'always' is not known"),
    ({"tools": TOOLS, "tool_choice": 1}, "must be a string or a dict"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "needs tools"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "'nope', which is not among the tools .*'get_weather'",
    ),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "A named tool_choice is"),
    (
        {"tools": [{"name": "f", "parameters": {"type": "objekt"}}], "tool_choice": "auto"},
        r"tools\[0\] \('f'\) parameters.*Invalid type",
    ),
    ({"tools": [{"parameters": {}}], "tool_choice": "auto"}, r'tools\[0\] has no "name"'),
    ({"tools": [{"name": "f", "parameters": []}], "tool_choice": "auto"}, "must be a JSON Schema"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "auto"}, "declared twice"),
    ({"tools": {"name": "f"}, "tool_choice": "auto"}, "must be a list"),
    ({"tools": ["f"], "tool_choice": "auto"}, r"tools\[0\] is a str"),
    (
        {"response_format": Grammar('start: "a"'), "tools": TOOLS, "tool_choice": "auto"},
        "cannot be combined with tool_choice='auto'",
    ),
]


@pytest.mark.parametrize("options, message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_options_raise_a_constraint_error_naming_the_problem(options, message):
    with pytest.raises(ConstraintError, match=message) as info:
        build_constraint(tokenizer(), **options)
    assert isinstance(info.value, GenerationError)
    assert len(str(info.value)) < 800  # long grammar errors are cut short


def test_a_token_outside_the_mask_is_refused():
    c = build_constraint(tokenizer(), {"type": "json_object"})
    with pytest.raises(ConstraintError, match="does not fit"):
        c.advance(encode("hello")[0])
