"""`granite-mlx serve` driven by real clients: the official `openai` client and httpx.

The server runs in-process (uvicorn on a thread, a free 127.0.0.1 port) over the
engine thread, with the tiny real-vocabulary model and the real tokenizer. Every
answer is compared with the library's own (`stream_generate` on a separate copy of
the model): the server must add nothing and lose nothing.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from granite_mlx.serve.schemas import OllamaGenerateRequest
from serve_helpers import MODEL_ID, LiveServer, count_steps, ndjson, wait_for
from structured_cases import TOOLS  # get_weather(city, unit)
from test_generate import EOS, force, real_vocab

from granite_mlx import stream_generate
from granite_mlx.chat_format import encode_prompt, snapshot_points
from granite_mlx.engine import MIN_SNAPSHOT_GAP


@pytest.fixture(scope="module")
def live():
    server = LiveServer(max_batch=8)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def library(prompt, **options):
    """(text, tokens, responses) of the library's own answer."""
    model, tokenizer = real_vocab()
    responses = list(stream_generate(model, tokenizer, prompt, **options))
    return "".join(r.text for r in responses), [r.token for r in responses], responses


def ask(n: int, text: str = "What is the capital of France?", system: str | None = None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    return messages


# --------------------------------------------------------------------------
# Answers equal the library's
# --------------------------------------------------------------------------


def test_chat_completion_equals_the_library(client):
    messages = ask(10)
    expected, tokens, responses = library(messages, max_tokens=10)
    out = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=10, temperature=0
    )
    choice = out.choices[0]
    assert choice.message.content == expected and choice.message.role == "assistant"
    assert choice.finish_reason == responses[-1].finish_reason
    assert out.object == "chat.completion" and out.model == MODEL_ID
    _, tokenizer = real_vocab()
    assert out.usage.prompt_tokens == len(encode_prompt(tokenizer, messages))
    assert out.usage.completion_tokens == len(tokens)
    assert out.usage.total_tokens == out.usage.prompt_tokens + len(tokens)
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_chat_equals_the_library_and_reports_usage(client):
    messages = ask(12, "Name three rivers.", system="Be brief.")
    expected, tokens, responses = library(messages, max_tokens=12)
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        max_completion_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == responses[-1].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1


def test_completions_equal_the_library_streamed_or_not(client):
    prompt = "The quick brown fox"
    expected, tokens, _ = library(prompt, max_tokens=8)
    out = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].text == expected and out.usage.completion_tokens == len(tokens)
    streamed = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected
    echoed = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompt + expected


def test_stop_strings_and_seeded_sampling_equal_the_library(client):
    messages = ask(16, "Tell me a story.")
    full, _, _ = library(messages, max_tokens=16)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected, _, _ = library(messages, max_tokens=16, stop=[stop])
    out = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=16, temperature=0, stop=stop
    )
    assert out.choices[0].message.content == expected and stop not in expected
    sampled, _, _ = library(messages, max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    out = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=10, temperature=0.9, top_p=0.9, seed=7
    )
    assert out.choices[0].message.content == sampled


def test_logprobs_are_the_sampled_tokens(client):
    messages = ask(6)
    _, _, responses = library(messages, max_tokens=6)
    out = client.chat.completions.create(
        model=MODEL_ID,
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    entries = out.choices[0].logprobs.content
    shown = [r for r in responses if r.token != EOS]
    assert len(entries) == len(shown)
    _, tokenizer = real_vocab()
    for entry, r in zip(entries, shown):
        assert entry.logprob == pytest.approx(r.logprob, abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        # Greedy: the sampled token is the most likely one, listed first.
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    assert b"".join(bytes(e.bytes) for e in entries).decode() == tokenizer.decode(
        [r.token for r in shown]
    )


def test_ollama_chat_and_generate_equal_the_library(live):
    messages = ask(8)
    expected, tokens, responses = library(messages, max_tokens=8)
    options = {"temperature": 0, "num_predict": 8}
    with httpx.Client(base_url=live.url, timeout=60) as http:
        whole = http.post(
            "/api/chat",
            json={"model": MODEL_ID, "messages": messages, "stream": False, "options": options},
        ).json()
        assert whole["message"] == {"role": "assistant", "content": expected}
        assert whole["done"] is True and whole["done_reason"] == responses[-1].finish_reason
        assert whole["eval_count"] == len(tokens)
        # Only what the prompt cache did not hold (an earlier test asked the same).
        prompt = encode_prompt(real_vocab()[1], messages)
        assert 0 <= whole["prompt_eval_count"] <= len(prompt)
        assert whole["total_duration"] >= whole["eval_duration"] > 0

        with http.stream(
            "POST",
            "/api/chat",
            json={"model": MODEL_ID + ":latest", "messages": messages, "options": options},
        ) as r:
            assert r.headers["content-type"].startswith("application/x-ndjson")
            lines = ndjson(list(r.iter_lines()))
        assert "".join(x["message"]["content"] for x in lines) == expected
        assert [x["done"] for x in lines] == [False] * (len(lines) - 1) + [True]

        _, tokenizer = real_vocab()
        generated = http.post(
            "/api/generate",
            json={
                "model": MODEL_ID,
                "prompt": messages[0]["content"],
                "stream": False,
                "options": options,
            },
        ).json()
        assert generated["response"] == expected
        assert generated["context"] == encode_prompt(tokenizer, messages) + tokens  # exact ids

        raw, raw_tokens, _ = library("Once upon a time", max_tokens=8)
        with http.stream(
            "POST",
            "/api/generate",
            json={"model": MODEL_ID, "raw": True, "prompt": "Once upon a time", "options": options},
        ) as r:
            lines = ndjson(list(r.iter_lines()))
        assert "".join(x["response"] for x in lines) == raw
        assert lines[-1]["context"][-len(raw_tokens) :] == raw_tokens


def test_models_health_tags_show_version(live, client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with httpx.Client(base_url=live.url) as http:
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["model"] == MODEL_ID
        assert health["requests"] == {"running": 0, "waiting": 0, "open": 0}
        assert health["prompt_cache"]["max_bytes"] == 256 * 2**20
        assert health["memory_gb"]["active"] > 0
        assert http.get("/").status_code == 200
        tags = http.get("/api/tags").json()["models"]
        assert [t["name"] for t in tags] == [MODEL_ID + ":latest"]
        assert tags[0]["details"]["family"] == "granite" and tags[0]["size"] > 0
        assert tags[0]["details"]["quantization_level"] == "F32"
        show = http.post("/api/show", json={"model": MODEL_ID}).json()
        assert show["model_info"]["granitehybrid.context_length"] == 4096
        assert "tools" in show["capabilities"]
        assert http.get("/api/version").json()["version"]
        assert http.get("/api/ps").json()["models"][0]["name"] == MODEL_ID + ":latest"
        empty = http.post("/api/chat", json={"model": MODEL_ID, "messages": []}).json()
        assert empty["done"] and empty["done_reason"] == "load"


# --------------------------------------------------------------------------
# Concurrency and prompt reuse
# --------------------------------------------------------------------------


def test_eight_concurrent_streams_each_equal_their_solo_run(live, client):
    prompts = [ask(0, f"Question number {i}: {'why ' * i}?") for i in range(8)]
    lengths = [6 + 2 * i for i in range(8)]
    expected = [library(p, max_tokens=n)[0] for p, n in zip(prompts, lengths)]
    results: list[str | None] = [None] * 8

    def run(i: int) -> None:
        stream = client.chat.completions.create(
            model=MODEL_ID, messages=prompts[i], max_tokens=lengths[i], temperature=0, stream=True
        )
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == expected


def test_growing_conversation_reuses_the_cache_and_stays_exact(client):
    """Five turns, each resending the whole history as chat apps do."""
    messages = [{"role": "system", "content": "You are terse."}]
    cached = []
    for turn in range(5):
        messages.append({"role": "user", "content": f"Turn {turn}: tell me about {turn * 'x'}."})
        expected, _, _ = library(messages, max_tokens=6)
        out = client.chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=6, temperature=0
        )
        assert out.choices[0].message.content == expected
        cached.append(out.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": expected})
    assert all(c > 0 for c in cached[1:]), cached


def test_what_chat_apps_and_agents_resend_reuses_the_cache_and_stays_exact(client):
    """Regenerate, edit the last question, a new chat over the same system prompt, an
    agent rewriting its last tool result: none extends an earlier request, yet each
    resumes from a message boundary the server asked the engine to snapshot."""
    _, tokenizer = real_vocab()
    system = {"role": "system", "content": "You answer questions about the attached report. " * 6}
    chat = [system, {"role": "user", "content": "First question?"}]
    first = client.chat.completions.create(
        model=MODEL_ID, messages=chat, max_tokens=4, temperature=0
    )
    chat += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Second question?"},
    ]
    client.chat.completions.create(model=MODEL_ID, messages=chat, max_tokens=4, temperature=0)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'},
    }
    agent = [
        system,
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 3}'},
    ]
    client.chat.completions.create(
        model=MODEL_ID, messages=agent, tools=TOOLS, max_tokens=4, temperature=0
    )
    # name: (messages, tools, how many leading messages the cache must cover)
    cases = {
        "regenerate": (chat, None, len(chat)),
        "edit": ([*chat[:-1], {"role": "user", "content": "Second question, again?"}], None, 3),
        "new chat, same system prompt": ([system, {"role": "user", "content": "Hi?"}], None, 1),
        "rewritten tool result": ([*agent[:-1], {**agent[-1], "content": "{}"}], TOOLS, 3),
    }
    for name, (messages, tools, kept) in cases.items():
        expected, _, _ = library(messages, tools=tools, max_tokens=4)
        options = {"tools": tools} if tools else {}
        out = client.chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=4, temperature=0, **options
        )
        assert out.choices[0].message.content == expected, name
        prompt = encode_prompt(tokenizer, messages, tools=tools)
        covered = encode_prompt(
            tokenizer, messages[:kept], tools=tools, add_generation_prompt=False
        )
        cached = out.usage.prompt_tokens_details.cached_tokens
        # (A boundary fewer than MIN_SNAPSHOT_GAP tokens after a held snapshot, such as the
        # end of an answer the engine kept, is not snapshotted again: resumed from there.)
        short = MIN_SNAPSHOT_GAP - 1
        assert len(covered) - short <= cached <= len(prompt), (name, cached, len(covered))


def test_snapshot_points_are_the_system_end_and_the_message_before_the_last():
    _, tokenizer = real_vocab()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Three?"},
    ]
    ids = encode_prompt(tokenizer, messages)
    ends = [len(encode_prompt(tokenizer, messages[:k], add_generation_prompt=False))
            for k in range(1, len(messages) + 1)]  # fmt: skip
    assert snapshot_points(tokenizer, ids) == [ends[0], ends[-2]]
    assert snapshot_points(tokenizer, ids, extra=[7]) == [7, ends[0], ends[-2]]
    plain = tokenizer.encode("no chat markup here", add_special_tokens=False)
    assert snapshot_points(tokenizer, plain) == []


# --------------------------------------------------------------------------
# Tool calls
# --------------------------------------------------------------------------


def forced_call(tokenizer, name="get_weather", arguments='{"city": "Paris", "unit": "celsius"}'):
    text = f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'
    return tokenizer.encode(text, add_special_tokens=False) + [EOS]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_round_trip(live, client, stream):
    _, tokenizer = real_vocab()
    messages = ask(0, "Weather in Paris?")
    forced = forced_call(tokenizer)
    live.engine.add_to_next(force(forced))
    out = client.chat.completions.create(
        model=MODEL_ID, messages=messages, tools=TOOLS, temperature=0, max_tokens=64, stream=stream
    )
    if stream:
        chunks = list(out)
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
        assert deltas[0].id and deltas[0].function.name == "get_weather"
        assert deltas[0].function.arguments == ""
        arguments = "".join(d.function.arguments or "" for d in deltas)
        assert {d.index for d in deltas} == {0}
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        call_id = deltas[0].id
    else:
        choice = out.choices[0]
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        arguments, finish, call_id = call.function.arguments, choice.finish_reason, call.id
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"} and finish == "tool_calls"

    # The call goes back as the assistant turn, with the tool's result: the server
    # renders it exactly as the model wrote it, so the prompt extends the last one.
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"temp_c": 21}'},
    ]
    first_prompt = encode_prompt(tokenizer, messages[:1], tools=TOOLS)
    assert encode_prompt(tokenizer, messages, tools=TOOLS)[: len(first_prompt) + len(forced)] == (
        first_prompt + forced
    )
    expected, _, _ = library(messages, tools=TOOLS, max_tokens=8)
    again = client.chat.completions.create(
        model=MODEL_ID, messages=messages, tools=TOOLS, temperature=0, max_tokens=8
    )
    assert again.choices[0].message.content == expected


def test_ollama_tool_calls_come_back_as_objects(live):
    _, tokenizer = real_vocab()
    live.engine.add_to_next(force(forced_call(tokenizer)))
    with httpx.Client(base_url=live.url, timeout=60) as http:
        body = {
            "model": MODEL_ID,
            "messages": ask(0, "Weather?"),
            "tools": TOOLS,
            "stream": False,
            "options": {"temperature": 0},
        }
        out = http.post("/api/chat", json=body).json()
    assert out["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
    ]


def test_a_tool_call_without_tools_offered_stays_text(live, client):
    _, tokenizer = real_vocab()
    forced = forced_call(tokenizer)
    live.engine.add_to_next(force(forced))
    out = client.chat.completions.create(
        model=MODEL_ID, messages=ask(0), temperature=0, max_tokens=64
    )
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].message.content == tokenizer.decode(forced[:-1])


# --------------------------------------------------------------------------
# Structured output (granite_mlx.constrain): a random model still answers in shape
# --------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 30},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


def test_response_format_json_schema_is_obeyed(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA,
                                                  "strict": True}}  # fmt: skip
    out = client.chat.completions.create(model=MODEL_ID, messages=ask(0, "Plan a trip."),
                                         response_format=fmt, temperature=0,
                                         max_tokens=60)  # fmt: skip
    data = json.loads(out.choices[0].message.content)
    assert set(data) == {"city", "days"} and isinstance(data["days"], int)
    assert out.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL_ID, messages=ask(0, "Plan a trip."),
                                              response_format=fmt, temperature=0,
                                              max_tokens=60, stream=True)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert json.loads(text) == data


def test_tool_choice_forces_a_valid_call(client):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = client.chat.completions.create(
            model=MODEL_ID, messages=ask(0, "Weather?"), tools=TOOLS, tool_choice=choice,
            temperature=0, max_tokens=60,
        )  # fmt: skip
        (call, *_) = out.choices[0].message.tool_calls
        arguments = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and len(arguments["city"]) <= 10
        assert arguments["unit"] in ("celsius", "fahrenheit")
        assert out.choices[0].finish_reason == "tool_calls"
    out = client.chat.completions.create(
        model=MODEL_ID, messages=ask(0, "Weather?"), tools=TOOLS, tool_choice="none",
        temperature=0, max_tokens=20,
    )  # fmt: skip
    assert out.choices[0].message.tool_calls is None


def test_ollama_format_is_obeyed(live):
    options = {"temperature": 0, "num_predict": 60}
    with httpx.Client(base_url=live.url, timeout=60) as http:
        body = {"model": MODEL_ID, "messages": ask(0, "Plan a trip."), "format": SCHEMA,
                "stream": False, "options": options}  # fmt: skip
        out = http.post("/api/chat", json=body).json()
        assert set(json.loads(out["message"]["content"])) == {"city", "days"}
        body = {"model": MODEL_ID, "prompt": "Plan a trip.", "format": SCHEMA, "stream": False,
                "options": options}  # fmt: skip
        out = http.post("/api/generate", json=body).json()
        assert set(json.loads(out["response"])) == {"city", "days"}
    # "json" is OpenAI's json_object (any object: a random model may not close it soon).
    json_body = OllamaGenerateRequest(model=MODEL_ID, prompt="x", format="json")
    assert json_body.response_format() == {"type": "json_object"}


def test_a_bad_schema_is_a_400_naming_it(live):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    with httpx.Client(base_url=live.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={**GOOD, "response_format": bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


# --------------------------------------------------------------------------
# Bad requests: the right 4xx, and the server keeps serving
# --------------------------------------------------------------------------

GOOD = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

BAD_REQUESTS = [
    # (method, path, body or raw bytes, status, words the message must hold)
    ("POST", "/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("POST", "/v1/chat/completions", b"", 400, "no body"),
    ("POST", "/v1/chat/completions", {**GOOD, "model": None}, 400, "model"),
    ("POST", "/v1/chat/completions", {**GOOD, "model": "gpt-4o"}, 404, "gpt-4o"),
    ("POST", "/v1/chat/completions", {**GOOD, "messages": []}, 400, "messages"),
    (
        "POST",
        "/v1/chat/completions",
        {**GOOD, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    ("POST", "/v1/chat/completions", {**GOOD, "messages": [{"role": "user"}]}, 400, "messages[0]"),
    (
        "POST",
        "/v1/chat/completions",
        {
            **GOOD,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ],
        },
        400,
        "text only",
    ),
    ("POST", "/v1/chat/completions", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/chat/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/chat/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {**GOOD, "n": 3}, 400, "n: only n=1"),
    ("POST", "/v1/chat/completions", {**GOOD, "stop": 5}, 400, "stop"),
    ("POST", "/v1/chat/completions", {**GOOD, "top_logprobs": 3}, 400, "top_logprobs"),
    (
        "POST",
        "/v1/chat/completions",
        {**GOOD, "logprobs": True, "top_logprobs": 50},
        400,
        "top_logprobs",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {**GOOD, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    ("POST", "/v1/chat/completions", {**GOOD, "tool_choice": "required"}, 400, "tool_choice"),
    (
        "POST",
        "/v1/chat/completions",
        {**GOOD, "tools": [{"type": "function", "function": {"name": "has space"}}]},
        400,
        "tools[0].function.name",
    ),
    ("POST", "/v1/chat/completions", {**GOOD, "logit_bias": {"999999999": 5}}, 400, "logit_bias"),
    (
        "POST",
        "/v1/chat/completions",
        {
            **GOOD,
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}
                    ],
                }
            ],
        },
        400,
        "messages[0].tool_calls[0].function.arguments",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {**GOOD, "messages": [{"role": "user", "content": "word " * 5000}]},
        400,
        "max_position_embeddings",
    ),
    (
        "POST",
        "/v1/completions",
        {"model": MODEL_ID, "prompt": "word " * 5000},
        400,
        "max_position_embeddings",
    ),
    (
        "POST",
        "/api/chat",
        {"model": MODEL_ID, "messages": [{"role": "user", "content": "word " * 5000}]},
        400,
        "max_position_embeddings",
    ),
    (
        "POST",
        "/api/generate",
        {"model": MODEL_ID, "prompt": "word " * 5000},
        400,
        "max_position_embeddings",
    ),
    ("POST", "/v1/completions", {"model": MODEL_ID, "prompt": ["a", "b"]}, 400, "prompt"),
    ("POST", "/v1/completions", {"model": MODEL_ID, "prompt": [1, 2, 10**9]}, 400, "vocabulary"),
    ("POST", "/v1/completions", {"model": MODEL_ID, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("GET", "/v1/chat/completions", None, 405, "POST"),
    ("GET", "/v1/nowhere", None, 404, "no route"),
    ("GET", "/v1/models/other-model", None, 404, "other-model"),
    (
        "POST",
        "/api/chat",
        {"model": MODEL_ID, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
        400,
        "images",
    ),
    (
        "POST",
        "/api/chat",
        {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "x"}],
            "options": {"num_predict": 0},
        },
        400,
        "options.num_predict",
    ),
    ("POST", "/api/generate", {"model": MODEL_ID, "prompt": "x", "format": 3}, 400, "format"),
    ("POST", "/api/generate", {"model": "llama3", "prompt": "x"}, 404, "llama3"),
    ("POST", "/api/show", {}, 400, "model"),
    ("GET", "/api/nothing", None, 404, "no route"),
]


def test_bad_requests_get_the_right_4xx_and_the_server_keeps_serving(live, client):
    assert len(BAD_REQUESTS) >= 20
    with httpx.Client(base_url=live.url, timeout=60) as http:
        for method, path, body, status, words in BAD_REQUESTS:
            if isinstance(body, bytes):
                r = http.request(
                    method, path, content=body, headers={"content-type": "application/json"}
                )
            else:
                r = http.request(method, path, json=body)
            where = f"{method} {path} {str(body)[:80]}"
            assert r.status_code == status, (where, r.text)
            error = r.json()["error"]
            if path.startswith("/api/"):
                message = error
            else:
                message = error["message"]
                assert error["type"] in ("invalid_request_error", "server_error")
            assert words in message, (where, message)
    # Still serving, with the same answer as before.
    expected, _, _ = library(GOOD["messages"], max_tokens=2)
    out = client.chat.completions.create(**GOOD, temperature=0)
    assert out.choices[0].message.content == expected
    assert live.service.flights == set()


def test_the_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "x"}], n=2
        )
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


# --------------------------------------------------------------------------
# Hang-ups, a full queue, the API key
# --------------------------------------------------------------------------


def test_a_client_hanging_up_mid_stream_cancels_its_row(live, client):
    steps = [0]
    live.engine.add_to_next(count_steps(steps, delay=0.01))
    with httpx.Client(base_url=live.url, timeout=60) as http:
        body = {**GOOD, "max_tokens": 3000, "stream": True, "temperature": 0}
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen >= 4:
                    break  # leaving the block closes the connection
    wait_for(lambda: not live.service.flights)
    stopped_at = steps[0]
    time.sleep(0.5)  # fifty more steps' worth of time, had the row gone on
    assert steps[0] <= stopped_at + 1 and stopped_at < 3000
    # Non-streaming requests notice the hang-up too.
    live.engine.add_to_next(count_steps(steps, delay=0.01))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            live.url + "/v1/chat/completions", json={**GOOD, "max_tokens": 3000}, timeout=0.5
        )
    wait_for(lambda: not live.service.flights)
    stopped_at = steps[0]
    time.sleep(0.5)
    assert steps[0] <= stopped_at + 1
    expected, _, _ = library(GOOD["messages"], max_tokens=2)
    assert client.chat.completions.create(**GOOD, temperature=0).choices[0].message.content == (
        expected
    )


def test_a_full_queue_answers_503_with_retry_after():
    server = LiveServer(max_batch=1, max_queue=1)  # one running, one waiting
    try:
        steps = [0]
        with httpx.Client(base_url=server.url, timeout=60) as http:
            body = {**GOOD, "max_tokens": 2000, "stream": True}
            server.engine.add_to_next(count_steps(steps, delay=0.02))
            with http.stream("POST", "/v1/chat/completions", json=body) as running:
                lines = running.iter_lines()  # kept: dropping it would close the connection
                next(lines)
                wait_for(lambda: server.engine.load == (1, 0))
                server.engine.add_to_next(count_steps(steps, delay=0.02))
                with http.stream("POST", "/api/chat", json=body) as waiting:
                    wait_for(lambda: server.engine.load == (1, 1))
                    busy = http.post("/v1/chat/completions", json=GOOD)
                    assert busy.status_code == 503 and busy.headers["retry-after"].isdigit()
                    assert "busy" in busy.json()["error"]["message"]
                    busy = http.post("/api/chat", json={**GOOD, "stream": False})
                    assert busy.status_code == 503 and "busy" in busy.json()["error"]
                    assert waiting.status_code == 200
            wait_for(lambda: not server.service.flights and server.engine.load == (0, 0))
            assert http.post("/v1/chat/completions", json=GOOD).status_code == 200
    finally:
        server.stop()


def test_api_key_is_required_when_set(live):
    keyed = LiveServer(api_key="s3cret", engine=live.engine)
    try:
        with httpx.Client(base_url=keyed.url, timeout=60) as http:
            r = http.post("/v1/chat/completions", json=GOOD)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "no API key" in r.json()["error"]["message"]
            r = http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and "wrong" in r.json()["error"]["message"]
            r = http.get("/api/tags")
            assert r.status_code == 401 and isinstance(r.json()["error"], str)
            assert http.get("/health").status_code == 200  # liveness stays open
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(**GOOD, temperature=0).choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        keyed.stop()


# --------------------------------------------------------------------------
# Shutdown
# --------------------------------------------------------------------------


def test_shutdown_ends_streams_in_flight_with_an_error():
    server = LiveServer(max_batch=4)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    outcomes: dict[str, object] = {}
    streaming = threading.Event()

    def openai_stream() -> None:
        stream = client.chat.completions.create(**{**GOOD, "max_tokens": 3000}, stream=True)
        try:
            for i, _ in enumerate(stream):
                if i == 2:
                    streaming.set()
            outcomes["openai"] = "ended without error"
        except openai.APIError as exc:
            outcomes["openai"] = exc

    def ollama_stream() -> None:
        body = {"model": MODEL_ID, "messages": GOOD["messages"], "options": {"num_predict": 3000}}
        with httpx.stream("POST", server.url + "/api/chat", timeout=60, json=body) as r:
            outcomes["ollama"] = [json.loads(line) for line in r.iter_lines()]

    steps = [0]
    threads = [threading.Thread(target=openai_stream), threading.Thread(target=ollama_stream)]
    for n, thread in enumerate(threads, start=1):
        server.engine.add_to_next(count_steps(steps, delay=0.01))  # runs until stopped
        thread.start()
        wait_for(lambda n=n: len(server.service.flights) == n)
    assert streaming.wait(30)
    server.stop(timeout=30)  # what Ctrl+C and SIGTERM do
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    assert isinstance(outcomes["openai"], openai.APIError)
    assert "shutting down" in str(outcomes["openai"])
    assert outcomes["ollama"][-1] == {"error": "the server is shutting down"}
    with pytest.raises(httpx.ConnectError):  # and it no longer listens
        httpx.get(server.url + "/health")
