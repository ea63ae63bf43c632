"""Regenerate tests/fixtures/chat_reference.json (run by hand, not by pytest).

Renders each conversation below with transformers' own ``apply_chat_template``
on the committed Granite 4.0 tokenizer (tests/fixtures/tokenizer), and records
the prompt text and token ids, plus encodings of some multilingual texts. The
tests compare our renderers and tokenizer against this file, so they need no
transformers-specific code path at test time.

    python tests/make_chat_reference.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKENIZER_DIR = HERE / "fixtures" / "tokenizer"
OUT = HERE / "fixtures" / "chat_reference.json"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather for a specified city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "Name of the city"}},
            "required": ["city"],
        },
    },
}
# The bare function dict, as the official template also accepts.
TIME_TOOL = {
    "name": "get_time",
    "description": 'Current time in a time zone, e.g. "Europe/Zürich".',
    "parameters": {
        "type": "object",
        "properties": {"tz": {"type": "string"}},
        "required": ["tz"],
    },
}
DOCUMENTS = [
    {
        "doc_id": 1,
        "title": "Granite 4.0",
        "text": "Granite 4.0 mixes Mamba-2 and attention layers.",
    },
    {"doc_id": 2, "title": "Café <notes>", "text": 'Prices: 3 € & 5 $ — «naïve» "quotes".'},
]

MULTILINGUAL = (
    "Grüße aus Zürich! 你好，世界。こんにちは。Привет, мир! مرحبا بالعالم. नमस्ते दुनिया। "
    "안녕하세요. Emoji: 👨‍👩‍👧‍👦 🇯🇵 👍🏽 🧑🏿‍🚀 ✨. Combining: é (e\u0301). Tabs\tand\r\nCRLF."
)

CASES: list[dict] = [
    {"name": "plain", "messages": [{"role": "user", "content": "Hello! How are you?"}]},
    {
        "name": "multi_turn",
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name one IBM Research lab in the US."},
            {"role": "assistant", "content": "Almaden Research Center, San Jose, California"},
            {"role": "user", "content": "And another?"},
        ],
    },
    {
        "name": "no_system_multi_turn",
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "  And 3+3? \n\n"},
        ],
    },
    {
        "name": "custom_system",
        "messages": [
            {"role": "system", "content": "Always answer in French."},
            {"role": "user", "content": "What is the capital of Italy?"},
        ],
    },
    {
        "name": "empty_system_gets_default",
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "Hi"},
        ],
    },
    {
        "name": "no_generation_prompt",
        "add_generation_prompt": False,
        "messages": [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi."},
        ],
    },
    {
        "name": "content_parts_and_late_system",
        "messages": [
            {
                "role": "system",
                "content": [
                    {"type": "text", "text": "Part one."},
                    {"type": "image", "url": "ignored.png"},
                    {"type": "text", "text": "Part two."},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "text", "text": "Line A"}, {"type": "text", "text": "Line B"}],
            },
            {"role": "assistant", "content": "Noted."},
            {"role": "system", "content": "A later system note."},
            {"role": "user", "content": "Continue."},
        ],
    },
    {
        "name": "tools",
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "messages": [{"role": "user", "content": "What's the weather like in Boston right now?"}],
    },
    {
        "name": "tools_with_system",
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
        ],
    },
    {
        "name": "available_tools_kwarg",
        "kwargs": {"available_tools": [TIME_TOOL]},
        "messages": [{"role": "user", "content": "What time is it in Tokyo?"}],
    },
    {
        "name": "tool_call_and_result",
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": "What's the weather like in Boston right now?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "get_current_weather",
                            "arguments": {"city": "Boston"},
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "clear"}'},
            {"role": "assistant", "content": "It is 21 °C and clear in Boston."},
            {"role": "user", "content": "Thanks!"},
        ],
    },
    {
        "name": "parallel_calls_consecutive_tool_messages",
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "messages": [
            {"role": "user", "content": "Weather in Boston and the time in Zürich?"},
            {
                "role": "assistant",
                "content": "Let me check both.",
                "tool_calls": [
                    {
                        "id": "a",
                        "type": "function",
                        "function": {
                            "name": "get_current_weather",
                            "arguments": {"city": "Boston"},
                        },
                    },
                    # Arguments as a JSON string (OpenAI wire format), inserted verbatim.
                    {
                        "id": "b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz": "Europe/Zürich"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "21 °C, clear"},
            {"role": "tool", "tool_call_id": "b", "content": "14:05"},
        ],
    },
    {
        "name": "bare_tool_calls_no_content",
        "tools": [TIME_TOOL],
        "messages": [
            {"role": "user", "content": "Time in Tokyo and Lima?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}},
                    {"name": "get_time", "arguments": {"tz": "America/Lima"}},
                ],
            },
            {"role": "tool", "content": "09:00"},
            {"role": "tool", "content": "19:00"},
            {"role": "tool", "content": "(third result)"},
            {"role": "assistant", "content": "Tokyo 09:00, Lima 19:00."},
        ],
    },
    {
        "name": "documents",
        "documents": DOCUMENTS,
        "messages": [{"role": "user", "content": "What layers does Granite 4.0 use?"}],
    },
    {
        "name": "documents_with_system",
        "documents": DOCUMENTS[:1],
        "messages": [
            {"role": "system", "content": "Cite the document id."},
            {"role": "user", "content": "Summarise."},
        ],
    },
    {
        "name": "tools_and_documents",
        "tools": [WEATHER_TOOL],
        "documents": DOCUMENTS,
        "messages": [{"role": "user", "content": "Anything about cafés?"}],
    },
    {
        "name": "multilingual_emoji",
        "messages": [
            {"role": "system", "content": "Réponds en français. 🇫🇷"},
            {"role": "user", "content": MULTILINGUAL},
            {"role": "assistant", "content": "D'accord ! 👍🏽 你好 🧑🏿‍🚀"},
            {"role": "user", "content": "Merci 🙏"},
        ],
    },
    {
        "name": "markup_in_content",
        "messages": [
            {"role": "user", "content": "Explain <tool_call> and {{ jinja }} {% raw %} in text."},
        ],
    },
]

TEXTS = [
    MULTILINGUAL,
    "👨‍👩‍👧‍👦🇯🇵👍🏽🧑🏿‍🚀",
    "def f(x):\n    return x ** 2  # squares\n",
    " leading space, trailing space ",
    "Ünïcödé ÀÉÎÕÜ ß ø æ å ł ğ ş ı",
]


def main() -> None:
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    template = (TOKENIZER_DIR / "chat_template.jinja").read_text(encoding="utf-8")
    assert tok.chat_template == template, "transformers did not load chat_template.jinja"

    cases = []
    for case in CASES:
        kwargs = dict(case.get("kwargs", {}))
        common = dict(
            tools=case.get("tools"),
            documents=case.get("documents"),
            add_generation_prompt=case.get("add_generation_prompt", True),
            **kwargs,
        )
        text = tok.apply_chat_template(case["messages"], tokenize=False, **common)
        ids = tok.apply_chat_template(case["messages"], tokenize=True, return_dict=False, **common)
        assert ids == tok.encode(text, add_special_tokens=False)
        cases.append({**case, "text": text, "ids": list(ids)})

    texts = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TEXTS]
    for entry in texts:
        assert tok.decode(entry["ids"]) == entry["text"]

    data = {
        "about": "Generated by tests/make_chat_reference.py with transformers "
        f"{transformers.__version__}; do not edit by hand.",
        "cases": cases,
        "texts": texts,
    }
    OUT.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(cases)} conversations, {len(texts)} texts)")


if __name__ == "__main__":
    main()
