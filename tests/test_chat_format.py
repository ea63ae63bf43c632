"""Chat rendering: the checkpoint template (sandboxed Jinja) and the built-in Granite 4.0
renderer, both against transformers' output recorded in fixtures/chat_reference.json."""

from __future__ import annotations

import datetime
import json
import random
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper

from granite_mlx.chat_format import (
    DEFAULT_SYSTEM_MESSAGE,
    ChatFormatError,
    checkpoint_template,
    encode_prompt,
    render_chat,
    render_prompt,
)
from granite_mlx.errors import GraniteError
from granite_mlx.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "tokenizer"
OFFICIAL = (TOKENIZER_DIR / "chat_template.jinja").read_text(encoding="utf-8")
REFERENCE = json.loads((FIXTURES / "chat_reference.json").read_text(encoding="utf-8"))
CASES = REFERENCE["cases"]


@pytest.fixture(scope="module")
def tok() -> TokenizerWrapper:
    return load_tokenizer(TOKENIZER_DIR)


def _kwargs(case: dict) -> dict[str, Any]:
    return dict(
        tools=case.get("tools"),
        documents=case.get("documents"),
        add_generation_prompt=case.get("add_generation_prompt", True),
        **case.get("kwargs", {}),
    )


def test_reference_covers_the_required_conversations() -> None:
    names = {c["name"] for c in CASES}
    assert {
        "plain",
        "multi_turn",
        "no_system_multi_turn",
        "custom_system",
        "tools",
        "tool_call_and_result",
        "parallel_calls_consecutive_tool_messages",
        "documents",
        "multilingual_emoji",
    } <= names


# ---------------------------------------------------------------- reference cases


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_checkpoint_template_matches_transformers(case: dict) -> None:
    assert render_chat(case["messages"], template=OFFICIAL, **_kwargs(case)) == case["text"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_builtin_renderer_matches_official_template(case: dict) -> None:
    assert render_chat(case["messages"], **_kwargs(case)) == case["text"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_token_ids_match_transformers(tok: TokenizerWrapper, case: dict) -> None:
    assert encode_prompt(tok, case["messages"], **_kwargs(case)) == case["ids"]
    builtin = render_chat(case["messages"], **_kwargs(case))
    assert tok.encode(builtin, add_special_tokens=False) == case["ids"]


def test_render_prompt_uses_the_checkpoint_template(tok: TokenizerWrapper) -> None:
    case = CASES[0]
    assert checkpoint_template(tok) == OFFICIAL
    assert render_prompt(tok, case["messages"]) == case["text"]


class _FakeTokenizer:
    """Just enough of a tokenizer for render_prompt/encode_prompt."""

    def __init__(self, real: TokenizerWrapper, template: Any) -> None:
        self.chat_template = template
        self.special_tokens_map = real.special_tokens_map
        self.encode = real.encode


def test_render_prompt_falls_back_to_builtin(tok: TokenizerWrapper) -> None:
    case = next(c for c in CASES if c["name"] == "tool_call_and_result")
    fake = _FakeTokenizer(tok, None)
    assert checkpoint_template(fake) is None
    assert render_prompt(fake, case["messages"], **_kwargs(case)) == case["text"]
    assert encode_prompt(fake, case["messages"], **_kwargs(case)) == case["ids"]


def test_render_prompt_prefers_a_custom_checkpoint_template(tok: TokenizerWrapper) -> None:
    fake = _FakeTokenizer(tok, "[{{ messages[0]['content'] }}|{{ eos_token }}]")
    assert render_prompt(fake, [{"role": "user", "content": "hi"}]) == "[hi|<|end_of_text|>]"


def test_named_templates_pick_tool_use_with_tools(tok: TokenizerWrapper) -> None:
    fake = _FakeTokenizer(tok, {"default": "D", "tool_use": "T"})
    msgs = [{"role": "user", "content": "x"}]
    assert render_prompt(fake, msgs) == "D"
    assert render_prompt(fake, msgs, tools=[{"name": "f"}]) == "T"


def test_encode_prompt_never_doubles_bos(tok: TokenizerWrapper) -> None:
    fake = _FakeTokenizer(tok, "{{ bos_token }}{{ messages[0]['content'] }}")
    ids = encode_prompt(fake, [{"role": "user", "content": "hello"}])
    assert ids == [100257, 15339]


# ---------------------------------------------------------------- sandbox behaviour


def _one(template: str, **kwargs: Any) -> str:
    return render_chat([{"role": "user", "content": "hi"}], template=template, **kwargs)


def test_tojson_is_plain_json_dumps() -> None:
    out = _one("{{ x | tojson }}", x={"a": "<é>&", "b": [1, 2.5, None, True]})
    assert out == '{"a": "<é>&", "b": [1, 2.5, null, true]}'
    assert _one("{{ x | tojson(indent=2) }}", x={"a": 1}) == '{\n  "a": 1\n}'
    assert _one("{{ x | tojson(sort_keys=True) }}", x={"b": 1, "a": 2}) == '{"a": 2, "b": 1}'
    assert _one("{{ x | tojson(ensure_ascii=True) }}", x="é") == '"\\u00e9"'


def test_raise_exception_becomes_chat_format_error() -> None:
    with pytest.raises(ChatFormatError, match="Only user turns allowed"):
        _one("{{ raise_exception('Only user turns allowed') }}")


def test_sandbox_blocks_python_internals() -> None:
    with pytest.raises(ChatFormatError, match="unsafe"):
        _one("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatFormatError):
        _one("{% set ns = namespace(_x=1) %}{{ ns._x }}")
    with pytest.raises(ChatFormatError):
        _one("{{ messages.append(1) }}")  # immutable sandbox


def test_loop_controls_and_globals() -> None:
    msgs = [{"role": "user", "content": str(i)} for i in range(5)]
    template = (
        "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}"
        "{% if loop.index0 == 3 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
        "|{{ dict(a=1)['a'] }}|{% set ns = namespace(n=0) %}{% set ns.n = 2 %}{{ ns.n }}"
    )
    assert render_chat(msgs, template=template) == "02|1|2"
    year = str(datetime.datetime.now().year)
    assert _one("{{ strftime_now('%Y') }}") in (year, str(int(year) + 1))


def test_trim_and_lstrip_blocks() -> None:
    template = "A\n    {% if true %}\nB\n    {% endif %}\nC"
    assert _one(template) == "A\nB\nC"


def test_generation_block_renders_its_body() -> None:
    assert _one("<{% generation %}{{ messages[0].content }}{% endgeneration %}>") == "<hi>"


def test_template_sees_variables_like_transformers() -> None:
    template = (
        "{{ 'content' in messages[0] }} {{ add_generation_prompt }} {{ tools }} "
        "{{ documents }} {{ custom }} {{ messages[0].reasoning_content }}"
    )
    msgs = [{"role": "assistant", "content": None, "thinking": "hmm"}]
    out = render_chat(msgs, template=template, add_generation_prompt=False, custom=7)
    assert out == "False False None None 7 hmm"


def test_invalid_jinja_is_a_clear_error() -> None:
    with pytest.raises(ChatFormatError, match="not valid Jinja"):
        _one("{% if %}")


@pytest.mark.parametrize(
    "template, error",
    [
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ 10.0 ** 400 }}", "OverflowError"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
        ("{{ '{:d}'.format('x') }}", "ValueError"),
        ("{{ strftime_now(5) }}", "TypeError"),
    ],
)
def test_anything_a_template_raises_is_a_chat_format_error(template: str, error: str) -> None:
    with pytest.raises(ChatFormatError, match=error) as info:
        _one(template)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "template, limit",
    [
        ("{{ 'x' * 10**9 }}", "'*' would build"),
        ("{{ [1] * 100000000 }}", "'*' would build"),
        ("{{ 7 ** 100000000 }}", "'**' would build"),
        ("{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
         "{% endfor %}{{ ns.n }}", "'*' would build"),
        ("{{ 'x' | center(10**9) }}", "count of 1000000000"),
        ("{{ 'x'.ljust(10**9) }}", "count of 1000000000"),
        ("{{ 'ab' | replace('a', 'b', 10**8) }}", "count of 100000000"),
    ],
)
def test_a_template_cannot_build_a_huge_value_in_one_step(template: str, limit: str) -> None:
    with pytest.raises(ChatFormatError, match=re.escape(limit)):
        _one(template)


def test_a_runaway_template_is_stopped_in_time(monkeypatch) -> None:
    import time

    from granite_mlx import chat_format

    monkeypatch.setattr(chat_format, "TEMPLATE_SECONDS", 0.5)
    endless = (  # 10**10 empty iterations: no output, no call the sandbox would see
        "{% set r = range(100000) | list %}"
        "{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}"
    )
    start = time.monotonic()
    with pytest.raises(ChatFormatError, match="ran for more than 0.5 s"):
        _one(endless)
    assert time.monotonic() - start < 5
    assert _one("{{ messages[0].content }}") == "hi"  # later renders are unaffected
    time.sleep(0.2)
    assert all(t.name != "granite-mlx chat template" for t in threading.enumerate())


def test_a_template_writing_too_much_is_stopped(monkeypatch) -> None:
    from granite_mlx import chat_format

    monkeypatch.setattr(chat_format, "TEMPLATE_MAX_CHARS", 100_000)
    with pytest.raises(ChatFormatError, match="wrote more than 100000 characters"):
        _one("{% for i in range(100000) %}{{ 'abcdefgh' }}{% endfor %}")


@pytest.mark.parametrize(
    "messages, where",
    [
        ([{"role": "user", "content": "bad \ud800 text"}], "messages[0]"),
        ([{"role": "user", "content": [{"type": "text", "text": "\udcff"}]}], "messages[0]"),
        ([{"role": "user", "content": "ok"}, {"role": "assistant", "content": "",
          "tool_calls": [{"function": {"name": "f", "arguments": {"k": "\udfff"}}}]}],
         "messages[1]"),
        ([{"role": "user\ud800", "content": "x"}], "messages[0]"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("template", [None, OFFICIAL])
def test_text_that_cannot_be_encoded_is_refused(messages, where: str, template) -> None:
    with pytest.raises(ChatFormatError, match=rf"{re.escape(where)} contains text that is not "
                                              "valid Unicode \\(a lone surrogate"):  # fmt: skip
        render_chat(messages, template=template)


def test_unencodable_tools_documents_and_variables_are_refused() -> None:
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatFormatError, match=r"tools\[0\]"):
        render_chat(msgs, tools=[{"name": "f", "description": "\ud800"}])
    with pytest.raises(ChatFormatError, match=r"documents\[0\]"):
        render_chat(msgs, documents=[{"text": "\ud800"}])
    with pytest.raises(ChatFormatError, match="template keyword arguments"):
        render_chat(msgs, template="x", custom="\ud800")


# ---------------------------------------------------------------- built-in renderer


def test_builtin_default_system_turn() -> None:
    out = render_chat([{"role": "user", "content": "hi"}])
    assert out.startswith("<|start_of_role|>system<|end_of_role|>" + DEFAULT_SYSTEM_MESSAGE)
    assert out.endswith("<|start_of_role|>assistant<|end_of_role|>")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ("hello", "list of dicts"),
        (["hello"], "must be a dict"),
        ([{"content": "x"}], "role"),
        ([{"role": "developer", "content": "x"}], "developer"),
        ([{"role": "user", "content": {"a": 1}}], "json.dumps"),
        ([{"role": "user", "content": [{"type": "text"}]}], "text"),
        ([{"role": "user", "content": object()}], "object"),
    ],
)
def test_builtin_rejects_bad_messages(messages: Any, match: str) -> None:
    with pytest.raises(ChatFormatError, match=match) as info:
        render_chat(messages)
    assert isinstance(info.value, GraniteError)


def test_tool_call_without_arguments_errors_in_both_renderers() -> None:
    msgs = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
    ]
    with pytest.raises(ChatFormatError, match="arguments"):
        render_chat(msgs)
    with pytest.raises(ChatFormatError):
        render_chat(msgs, template=OFFICIAL)


def test_tools_must_be_dicts() -> None:
    with pytest.raises(ChatFormatError, match="tools"):
        render_chat([{"role": "user", "content": "x"}], tools=["get_weather"])
    with pytest.raises(ChatFormatError, match="documents"):
        render_chat([{"role": "user", "content": "x"}], documents="some text")


def _random_content(rng: random.Random) -> Any:
    words = ["hi", "", " ", "\n", "Zürich", "你好", "🧑🏿‍🚀", "{{ x }}", "<tool_call>", "a\tb"]
    kind = rng.randrange(6)
    if kind == 0:
        return [
            {"type": rng.choice(["text", "text", "image"]), "text": rng.choice(words)}
            for _ in range(rng.randrange(4))
        ]
    if kind == 1:
        return None
    return "".join(rng.choice(words) for _ in range(rng.randrange(4)))


def _random_call(rng: random.Random) -> dict:
    args: Any = {"q": rng.choice(["x", "é", "🚀"]), "n": rng.randrange(3)}
    if rng.random() < 0.3:
        args = json.dumps(args)
    fn = {"name": rng.choice(["search", "get_time"]), "arguments": args}
    return {"type": "function", "function": fn, "id": "c"} if rng.random() < 0.6 else fn


def _random_conversation(rng: random.Random) -> tuple[list[dict], dict[str, Any]]:
    msgs: list[dict] = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": _random_content(rng)})
    for _ in range(rng.randrange(1, 8)):
        role = rng.choice(["user", "assistant", "tool", "tool", "system"])
        msg: dict[str, Any] = {"role": role, "content": _random_content(rng)}
        if role == "assistant" and rng.random() < 0.5:
            msg["tool_calls"] = [_random_call(rng) for _ in range(rng.randrange(3))]
        msgs.append(msg)
    tool = {"name": "search", "parameters": {"type": "object", "properties": {}}}
    doc = {"title": "T", "text": "Body é"}
    kwargs: dict[str, Any] = {
        "tools": rng.choice([None, [], [tool], [{"type": "function", "function": tool}, tool]]),
        "documents": rng.choice([None, [], [doc], [doc, {"text": "2"}]]),
        "add_generation_prompt": rng.random() < 0.7,
    }
    if rng.random() < 0.15:
        kwargs["available_tools"] = [tool]
    return msgs, kwargs


def test_builtin_matches_official_template_on_random_conversations() -> None:
    rng = random.Random(1234)
    for _ in range(400):
        msgs, kwargs = _random_conversation(rng)
        expected = render_chat(msgs, template=OFFICIAL, **kwargs)
        assert render_chat(msgs, **kwargs) == expected, (msgs, kwargs)
