"""Structured output through the generation clients, on a random-weight model.

The model is ``real_vocab`` (the real Granite vocabulary and tokenizer, random
weights): its free output is garbage, so only the constraint can make it valid.
Every answer must parse and validate (jsonschema), greedy and sampled, and the
greedy tokens must be those of a plain reference loop (model call, mask, argmax).
"""

from __future__ import annotations

import json
import re

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from structured_cases import SCHEMAS, TOOLS, tool_parameters
from test_generate import real_vocab, tiny

from granite_mlx import ChatSession, GenerationError, Request, batch_generate, stream_generate
from granite_mlx.chat_format import encode_prompt
from granite_mlx.constrain import ConstraintError, Regex, build_constraint
from granite_mlx.engine import Engine

EOS = 100257
PROMPT = [{"role": "user", "content": "Answer with JSON only."}]
MAX_TOKENS = 96  # every schema's longest answer is far shorter


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def run(prompt=PROMPT, **options):
    """(tokens, text, final response) of one streamed answer."""
    tokens, text, last = [], [], None
    for last in stream_generate(*real_vocab(), prompt, **options):
        if last.token is not None:
            tokens.append(last.token)
        text.append(last.text)
    return tokens, "".join(text), last


def reference(prompt_ids: list[int], constraint, max_tokens: int) -> list[int]:
    """Greedy decoding the plain way: one model call per token, mask, argmax."""
    model, _ = real_vocab()
    cache = model.make_cache()
    inputs, out = mx.array([prompt_ids]), []
    for _ in range(max_tokens):
        logits = model(inputs, cache)[0, -1].astype(mx.float32)  # (V,)
        bits = np.unpackbits(constraint.mask().view(np.uint8), bitorder="little")
        allowed = mx.array(bits[: logits.shape[0]].astype(bool))
        token = int(mx.argmax(mx.where(allowed, logits, -mx.inf)).item())
        out.append(token)
        if token == EOS:
            break
        constraint.advance(token)
        if constraint.is_finished():
            break
        inputs = mx.array([[token]])
    return out


def check_json(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


# --------------------------------------------------------------------------
# JSON Schema: every answer parses and validates; greedy = the reference loop
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_greedy_answer_is_the_masked_argmax_and_validates(name):
    schema = SCHEMAS[name][0]
    tokens, text, last = run(response_format=fmt(schema), max_tokens=MAX_TOKENS)
    _, tokenizer = real_vocab()
    ids = encode_prompt(tokenizer, PROMPT)
    assert tokens == reference(ids, build_constraint(tokenizer, fmt(schema)), MAX_TOKENS)
    assert last.finish_reason == "stop"
    check_json(text, schema)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sampled_answers_validate_for_every_schema(seed):
    names = sorted(SCHEMAS)
    answers = batch_generate(
        *real_vocab(), [PROMPT] * len(names), response_format=[fmt(SCHEMAS[n][0]) for n in names],
        temperature=1.0, top_k=0, seed=seed, max_tokens=MAX_TOKENS,
    )  # fmt: skip
    for name, text in zip(names, answers):
        check_json(text, SCHEMAS[name][0])
    assert len(set(answers)) > 1


def test_rows_of_one_batch_have_their_own_constraints():
    names = ["nested", "enum", "pattern"]
    formats = [fmt(SCHEMAS[n][0]) for n in names] + [None]
    answers = batch_generate(*real_vocab(), [PROMPT] * 4, response_format=formats, max_tokens=24)
    for name, text in zip(names, answers):
        assert text == run(response_format=fmt(SCHEMAS[name][0]), max_tokens=24)[1]
    assert answers[3] == run(max_tokens=24)[1]  # the free row: the model's own garbage
    with pytest.raises(json.JSONDecodeError):
        json.loads(answers[3])


def test_pydantic_model_regex_and_json_object():
    from pydantic import BaseModel, Field

    class Ticket(BaseModel):
        id: int = Field(ge=0, le=99)
        label: str = Field(max_length=8)

    _, text, _ = run(response_format=Ticket, max_tokens=MAX_TOKENS)
    Ticket.model_validate_json(text)
    _, text, _ = run(response_format=Regex(r"[A-Z]{2}-[0-9]{3}"), max_tokens=MAX_TOKENS)
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", text)


def test_no_constraint_leaves_the_output_unchanged():
    plain = run(max_tokens=24)[0]
    assert run(response_format={"type": "text"}, max_tokens=24)[0] == plain
    assert run(response_format=None, tool_choice=None, max_tokens=24)[0] == plain
    assert (
        run(tools=TOOLS, max_tokens=24)[0] == run(tools=TOOLS, tool_choice=None, max_tokens=24)[0]
    )


def test_stop_strings_apply_to_constrained_text():
    schema = SCHEMAS["flat"][0]
    _, full, _ = run(response_format=fmt(schema), max_tokens=MAX_TOKENS)
    _, text, last = run(response_format=fmt(schema), stop=", ", max_tokens=MAX_TOKENS)
    assert last.finish_reason == "stop" and full.startswith(text + ", ")


def test_bad_options_raise_at_the_call():
    model, tokenizer = real_vocab()
    with pytest.raises(ConstraintError, match="not known"):
        stream_generate(model, tokenizer, PROMPT, response_format={"type": "xml"})
    with pytest.raises(ConstraintError, match="needs tools"):
        stream_generate(model, tokenizer, PROMPT, tool_choice="required")
    with pytest.raises(ConstraintError, match="one per prompt"):
        batch_generate(model, tokenizer, [PROMPT] * 2, response_format=[None])


def test_the_engine_refuses_a_constraint_it_cannot_use():
    model, tokenizer = real_vocab()
    with pytest.raises(GenerationError, match="mask"):
        Engine(model, tokenizer).add(Request(prompt=[1, 2], constraint=object()))
    # A tiny model with 512 ids cannot produce most of what the real tokenizer's mask allows.
    small, _ = tiny("hybrid_nope")
    constraint = build_constraint(tokenizer, {"type": "json_object"})
    with pytest.raises(GenerationError, match="covers 100352 token ids but the model has 512"):
        Engine(small, tokenizer).add(Request(prompt=[1, 2], constraint=constraint))


# --------------------------------------------------------------------------
# Tool calls
# --------------------------------------------------------------------------


def check_calls(last, names=None) -> None:
    assert last.tool_calls, "no tool call"
    for call in last.tool_calls:
        assert call.valid, call.error
        assert call.name in (names or [t["function"]["name"] for t in TOOLS])
        jsonschema.validate(call.arguments, tool_parameters(call.name))


ASK = [{"role": "user", "content": "What is the weather in Paris? Then set an alarm."}]


@pytest.mark.parametrize("seed", [None, 1, 2, 3, 4])
def test_required_always_calls_a_declared_tool_with_valid_arguments(seed):
    temperature = 0.0 if seed is None else 1.0
    tokens, text, last = run(
        ASK, tools=TOOLS, tool_choice="required", temperature=temperature, seed=seed,
        max_tokens=MAX_TOKENS,
    )  # fmt: skip
    check_calls(last)
    assert tokens[0] == 100270 and text.strip() == ""  # the markup is never shown
    if seed is None:
        _, tokenizer = real_vocab()
        constraint = build_constraint(tokenizer, tools=TOOLS, tool_choice="required")
        ids = encode_prompt(tokenizer, ASK, tools=TOOLS)
        assert tokens == reference(ids, constraint, MAX_TOKENS)


def test_named_tool_choice_calls_that_tool_once():
    choice = {"type": "function", "function": {"name": "set_alarm"}}
    for seed in (1, 2):
        _, _, last = run(
            ASK, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=seed, max_tokens=MAX_TOKENS
        )
        check_calls(last, ["set_alarm"])
        assert len(last.tool_calls) == 1 and last.finish_reason == "stop"


def prefer(token: int):
    """A logits processor that pushes ``token`` to the top: the model "wants" it."""

    def processor(history: mx.array, logits: mx.array) -> mx.array:
        return mx.where(mx.arange(logits.shape[-1]) == token, logits.max() + 10.0, logits)

    return processor


def test_auto_lets_the_model_call_or_answer_and_checks_the_call():
    # A model that wants to call right away calls, validly.
    _, text, last = run(
        ASK, tools=TOOLS, tool_choice="auto", logits_processors=[prefer(100270)], max_tokens=64
    )
    check_calls(last)
    assert text.strip() == ""
    # Left to itself, the random model writes text (and any call it starts is valid).
    for seed in (1, 2, 3):
        _, text, last = run(
            ASK, tools=TOOLS, tool_choice="auto", temperature=1.0, seed=seed, max_tokens=32
        )
        assert text and all(c.valid for c in last.tool_calls)
        for call in last.tool_calls:
            jsonschema.validate(call.arguments, tool_parameters(call.name))


def test_none_forbids_calls_even_when_the_model_wants_one():
    tokens, _, last = run(ASK, tools=TOOLS, logits_processors=[prefer(100270)], max_tokens=4)
    assert tokens[0] == 100270  # unconstrained, the call starts
    tokens, text, last = run(
        ASK, tools=TOOLS, tool_choice="none", logits_processors=[prefer(100270)], max_tokens=16
    )
    assert 100270 not in tokens and not last.tool_calls and text


# --------------------------------------------------------------------------
# Chat sessions: send, regenerate, edit
# --------------------------------------------------------------------------


def test_chat_session_send_regenerate_and_edit_with_a_constraint():
    model, tokenizer = real_vocab()
    chat = ChatSession(model, tokenizer, tools=TOOLS)
    flat, enum = SCHEMAS["flat"][0], SCHEMAS["enum"][0]
    first = "".join(r.text for r in chat.send("Who?", response_format=fmt(flat), max_tokens=64))
    check_json(first, flat)
    again = "".join(r.text for r in chat.regenerate(response_format=fmt(flat), max_tokens=64))
    assert again == first  # greedy: the same answer from the snapshot
    edited = "".join(
        r.text for r in chat.edit_last("How?", response_format=fmt(enum), max_tokens=64)
    )
    check_json(edited, enum)
    responses = list(chat.send("Call a tool.", tool_choice="required", max_tokens=MAX_TOKENS))
    check_calls(responses[-1])
    assert chat.messages[-1]["tool_calls"]
    assert [m["content"] for m in chat.messages if m["role"] == "assistant"][:1] == [edited]


# --------------------------------------------------------------------------
# The other response formats through the clients, per-row tool choices, hard arguments
# --------------------------------------------------------------------------


def test_json_object_and_a_lark_grammar_through_the_clients():
    from granite_mlx import generate
    from granite_mlx.constrain import Grammar

    model, tokenizer = real_vocab()
    (open_,), (close,) = (tokenizer.encode(c, add_special_tokens=False) for c in "{}")
    # Any object: a model that wants "{" most and "}" next writes "{}", and stops there.
    wants = [prefer(close), prefer(open_)]  # applied in turn: "{" ends up on top
    options = {"response_format": {"type": "json_object"}, "max_tokens": MAX_TOKENS}
    _, text, last = run(logits_processors=wants, **options)
    assert text == "{}" and last.finish_reason == "stop"
    assert generate(model, tokenizer, PROMPT, logits_processors=wants, **options) == text
    # Left to itself, the random model still writes an object (or runs out of tokens inside one).
    _, text, last = run(**options)
    assert text.startswith("{")
    if last.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    # A Lark grammar: only its sentences come out, greedy and sampled.
    lark = 'start: answer " " city\nanswer: "yes" | "no"\ncity: /[A-Z][a-z]{1,8}/'
    for seed in (None, 1, 2):
        _, text, last = run(
            response_format=Grammar(lark), temperature=0.0 if seed is None else 1.0, seed=seed,
            max_tokens=MAX_TOKENS,
        )  # fmt: skip
        assert re.fullmatch(r"(yes|no) [A-Z][a-z]{1,8}", text) and last.finish_reason == "stop"


def test_batch_rows_with_their_own_tool_choice_equal_their_solo_runs():
    choices = ["required", None, "none", {"type": "function", "function": {"name": "set_alarm"}}]
    options = {"tools": TOOLS, "max_tokens": MAX_TOKENS, "logits_processors": [prefer(100270)]}
    answers = batch_generate(*real_vocab(), [ASK] * 4, tool_choice=choices, **options)
    for choice, text in zip(choices, answers):
        assert text == run(ASK, tool_choice=choice, **options)[1]
    assert answers[0].strip() == "" and answers[3].strip() == ""  # calls: no text shown
    assert answers[2]  # "none": the call is forbidden, text comes instead


def test_tool_arguments_with_colons_escapes_and_quotes_round_trip_exactly():
    # The peers' bug: arguments holding ":" or "\u..." were cut or unescaped wrongly.
    hard = 'a:b \\u00e9 "q" é:{x}'
    tools = [{"type": "function", "function": {
        "name": "note", "description": "Save a note.",
        "parameters": {"type": "object", "properties": {"text": {"enum": [hard]}},
                       "required": ["text"], "additionalProperties": False}}}]  # fmt: skip
    for seed in (None, 1):
        _, _, last = run(
            ASK, tools=tools, tool_choice="required", temperature=0.0 if seed is None else 1.0,
            seed=seed, max_tokens=MAX_TOKENS,
        )  # fmt: skip
        assert [(c.name, c.arguments, c.valid) for c in last.tool_calls] == [
            ("note", {"text": hard}, True)
        ]
        assert json.loads(last.tool_calls[0].to_openai()["function"]["arguments"]) == {"text": hard}
