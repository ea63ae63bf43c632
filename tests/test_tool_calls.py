"""Streaming tool-call parsing of Granite output."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from granite_mlx.tool_calls import ToolCall, ToolCallParser, parse_tool_calls

CALL = '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "Boston"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"Europe/Zürich\\"}"}\n</tool_call>'


def _pieces(text: str, rng: random.Random, low: int = 1, high: int = 3) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(low, high)
        out.append(text[i : i + n])
        i += n
    return out


def _stream(pieces: list[str]) -> tuple[list[str], list[ToolCall]]:
    """Feed pieces; return every text chunk shown (finish's included) and all calls."""
    parser = ToolCallParser()
    shown, calls = [], []
    for piece in pieces:
        text, new = parser.feed(piece)
        shown.append(text)
        calls.extend(new)
    text, new = parser.finish()
    shown.append(text)
    calls.extend(new)
    return shown, calls


def _assert_no_markup(shown: list[str]) -> None:
    # Check the running text too: markup could be split across chunks.
    running = "".join(shown)
    for tag in ("<tool_call", "tool_call>", '{"name"'):
        assert tag not in running


@pytest.mark.parametrize("seed", range(25))
def test_call_streamed_in_small_pieces_with_text_around(seed: int) -> None:
    text = "Let me check the weather. " + CALL + " Anything else?"
    shown, calls = _stream(_pieces(text, random.Random(seed)))
    _assert_no_markup(shown)
    assert "".join(shown) == "Let me check the weather.  Anything else?"
    assert len(calls) == 1
    call = calls[0]
    assert call.valid and call.error is None
    assert call.name == "get_current_weather"
    assert call.arguments == {"city": "Boston"}
    assert call.raw == CALL
    assert call.id.startswith("call_")


def test_text_before_a_call_is_shown_before_the_call_ends() -> None:
    parser = ToolCallParser()
    assert parser.feed("Sure, ") == ("Sure, ", [])
    assert parser.feed("checking.\n<tool") == ("checking.\n", [])
    assert parser.feed('_call>\n{"name"') == ("", [])
    assert parser.in_tool_call
    text, calls = parser.feed(': "f", "arguments": {}}\n</tool_call>done')
    assert text == "done"
    assert [c.name for c in calls] == ["f"]
    assert not parser.in_tool_call


@pytest.mark.parametrize("seed", range(10))
def test_two_calls(seed: int) -> None:
    text = "A" + CALL + "\n" + CALL2 + "B"
    shown, calls = _stream(_pieces(text, random.Random(seed)))
    _assert_no_markup(shown)
    assert "".join(shown) == "A\nB"
    assert [c.name for c in calls] == ["get_current_weather", "get_time"]
    # Arguments sent as a JSON string are decoded.
    assert calls[1].arguments == {"tz": "Europe/Zürich"}
    assert all(c.valid for c in calls)
    assert calls[0].id != calls[1].id


@pytest.mark.parametrize(
    "body, error, name",
    [
        ('{"name": "f", "arguments": {"a": 1}', "malformed JSON", ""),
        ("not json at all", "malformed JSON", ""),
        ('["f", {}]', "JSON object", ""),
        ('{"arguments": {"a": 1}}', "name", ""),
        ('{"name": "", "arguments": {}}', "name", ""),
        ('{"name": 3, "arguments": {}}', "name", ""),
        ('{"name": "f", "arguments": [1, 2]}', "arguments", "f"),
        ('{"name": "f", "arguments": "{bad"}', "arguments string", "f"),
    ],
)
def test_bad_calls_are_invalid_not_raised(body: str, error: str, name: str) -> None:
    raw = "<tool_call>\n" + body + "\n</tool_call>"
    content, calls = parse_tool_calls("before " + raw + " after")
    assert content == "before  after"
    assert len(calls) == 1
    call = calls[0]
    assert not call.valid
    assert error in call.error
    assert call.raw == raw
    assert call.name == name
    assert call.arguments == {}


def test_call_without_arguments_takes_none() -> None:
    _, calls = parse_tool_calls('<tool_call>{"name": "now"}</tool_call>')
    assert calls[0].valid and calls[0].arguments == {}


def test_unterminated_call_is_reported_by_finish() -> None:
    parser = ToolCallParser()
    text, calls = parser.feed('Checking.<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n')
    assert (text, calls) == ("Checking.", [])
    text, calls = parser.finish()
    assert text == ""
    assert len(calls) == 1
    call = calls[0]
    assert not call.valid
    assert "unterminated" in call.error
    assert call.raw == '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n'
    assert call.name == "f"  # recovered to help the error report


def test_unterminated_call_cut_mid_json() -> None:
    content, calls = parse_tool_calls('Hi <tool_call>{"name": "f", "argu')
    assert content == "Hi "
    assert not calls[0].valid and "unterminated" in calls[0].error
    assert calls[0].raw == '<tool_call>{"name": "f", "argu'


def test_partial_tag_is_held_back_then_released_as_text() -> None:
    parser = ToolCallParser()
    assert parser.feed("x <tool_c") == ("x ", [])
    assert parser.feed("ar is a car") == ("<tool_car is a car", [])
    assert parser.feed("<") == ("", [])
    assert parser.feed("b>bold") == ("<b>bold", [])
    assert parser.feed(" 1 <tool") == (" 1 ", [])
    assert parser.finish() == ("<tool", [])


def test_lone_angle_brackets_and_lookalikes_pass_through() -> None:
    text = "a < b, <tool> <tool_calls> </tool_call> <<tool_call"
    shown, calls = _stream(list(text))
    assert "".join(shown) == text
    assert calls == []


@pytest.mark.parametrize("seed", range(20))
def test_streaming_equals_one_shot(seed: int) -> None:
    rng = random.Random(seed)
    parts = ["Hello ", CALL, "\n", CALL2, " x <tool_", "call>{bad}</tool_call>", "<tool_c", "end"]
    text = "".join(rng.choice(parts) for _ in range(8))
    content, calls = parse_tool_calls(text)
    shown, streamed = _stream(_pieces(text, rng, 1, 7))
    assert "".join(shown) == content
    key = [(c.name, c.arguments, c.raw, c.valid, c.error) for c in calls]
    assert [(c.name, c.arguments, c.raw, c.valid, c.error) for c in streamed] == key
    # Nothing is lost: shown text plus each call's raw markup is the whole output.
    assert len(content) + sum(len(c.raw) for c in calls) == len(text)


def test_to_openai() -> None:
    _, (call,) = parse_tool_calls(CALL)
    assert call.to_openai() == {
        "id": call.id,
        "type": "function",
        "function": {"name": "get_current_weather", "arguments": '{"city": "Boston"}'},
    }


def test_with_real_tokens_through_the_detokenizer() -> None:
    """Model output token by token: detokenizer -> parser, as generation will run it."""
    from granite_mlx.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(__file__).parent / "fixtures" / "tokenizer")
    output = "Sure 👍🏽 " + CALL + "<|end_of_text|>"
    ids = tok.encode(output, add_special_tokens=False)
    assert 100270 in ids  # <tool_call> is one token
    detok, parser = tok.detokenizer, ToolCallParser()
    shown, calls = [], []
    for token in ids:
        if token in tok.eos_token_ids:
            break
        detok.add_token(token)
        text, new = parser.feed(detok.last_segment)
        shown.append(text)
        calls += new
    detok.finalize()
    text, new = parser.feed(detok.last_segment)
    shown.append(text)
    calls += new
    text, new = parser.finish()
    shown.append(text)
    calls += new
    assert "".join(shown) == "Sure 👍🏽 "
    assert [(c.name, c.arguments, c.valid) for c in calls] == [
        ("get_current_weather", {"city": "Boston"}, True)
    ]


# --- Declared tools, and JSON that must never raise or travel on ------------------

WEATHER = {"type": "function", "function": {"name": "get_current_weather", "parameters": {}}}


@pytest.mark.parametrize(
    "tools, valid",
    [
        (None, True),  # nothing declared to check against
        (["get_current_weather"], True),
        ([WEATHER], True),
        ([WEATHER["function"]], True),
        (["get_time"], False),
        ([{"type": "function", "function": {"name": "get_time"}}], False),
        ([], False),
    ],
)
def test_a_call_to_an_undeclared_tool_is_invalid(tools, valid: bool) -> None:
    for calls in (parse_tool_calls(CALL, tools=tools)[1], _stream_with(CALL, tools)):
        (call,) = calls
        assert call.valid is valid and call.name == "get_current_weather"
        assert call.arguments == {"city": "Boston"}  # kept, to tell the model what it asked
        if not valid:
            assert "'get_current_weather' was not declared" in call.error


def _stream_with(text: str, tools) -> list[ToolCall]:
    parser, calls = ToolCallParser(tools=tools), []
    for piece in _pieces(text, random.Random(0)):
        calls += parser.feed(piece).calls
    return calls + parser.finish().calls


def _call(arguments: str, name: str = '"f"') -> str:
    return '<tool_call>{"name": ' + name + ', "arguments": ' + arguments + "}</tool_call>"


@pytest.mark.parametrize(
    "text, error",
    [
        (_call('{"a": ' * 50_000 + "1" + "}" * 50_000), "RecursionError"),
        (_call("[" * 150 + "]" * 150), "nested deeper than 100"),
        (_call('{"n": ' + "9" * 5000 + "}"), "malformed JSON"),
        (_call('"{\\"n\\": ' + "9" * 5000 + '}"'), "arguments string is not valid JSON"),
        (_call('{"x": NaN}'), "malformed JSON"),
        (_call('{"x": -Infinity}'), "malformed JSON"),
        (_call('{"x": 1e999}'), "out of range"),
        (_call('{"city": "\\ud800"}'), "lone surrogate \\ud800"),
        (_call('{"\\udfff": 1}'), "lone surrogate \\udfff"),
        (_call("{}", name='"f\\ud800"'), "lone surrogate"),
        (_call('"{\\"city\\": \\"\\\\ud800\\"}"'), "lone surrogate"),
    ],
    ids=["deep nesting", "over MAX_DEPTH", "5000-digit integer", "5000 digits in a string",
         "NaN", "Infinity", "float overflow", "lone surrogate value", "lone surrogate key",
         "lone surrogate name", "lone surrogate in double-encoded arguments"],
)  # fmt: skip
def test_json_that_cannot_travel_on_is_invalid_never_raised(text: str, error: str) -> None:
    for calls in (parse_tool_calls("a" + text + "b")[1], _stream_with(text, None)):
        (call,) = calls
        assert not call.valid and error in call.error, call.error
        assert call.arguments == {}
        json.dumps(call.to_openai())  # what reaches a client or an export is encodable
        call.to_openai()["function"]["arguments"].encode("utf-8")


def test_surrogate_pairs_are_fine() -> None:
    (call,) = parse_tool_calls(_call('{"mood": "\\ud83d\\ude00"}'))[1]
    assert call.valid and call.arguments == {"mood": "😀"}
