"""A scripted stand-in for the model, for tests and for ``granite-chat --fake-engine``.

``FakeSession`` mimics ``granite_mlx.session.ChatSession`` (send, regenerate, edit_last,
save/load, from_messages, documents, prompt_progress, the cached and context token
counts) and streams canned text with small delays; ``FakeEngine`` is the real
``EngineThread`` with that session plugged in, so cancelling, batching and error
handling run the same code as with a real model.

Token counts are characters / 4 (``fake_tokens``): enough to drive the counters.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import EngineThread
from .protocol import Event

FENCE = "```"


def fake_tokens(text: str) -> int:
    return len(text) // 4


def default_reply(user_text: str) -> str:
    """A short deterministic answer with a code block; "long" asks for a long one."""
    first_line = user_text.strip().splitlines()[0] if user_text.strip() else ""
    if "long" in user_text.lower():
        lines = [f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(400)]
        return "Here is a long answer.\n\n" + "\n\n".join(lines)
    return (
        f"You said: {first_line}\n\n"
        f"Here is some code:\n\n"
        f'{FENCE}python\ndef greet(name):\n    return f"Hello, {{name}}!"\n{FENCE}\n\n'
        f"Anything else?"
    )


@dataclass
class FakeToolCall:
    name: str
    arguments: dict[str, Any]
    raw: str = ""
    valid: bool = True
    error: str | None = None


@dataclass
class FakeResponse:
    """The fields of granite_mlx's GenerationResponse that the engine reads."""

    text: str
    token: int = 0
    logprob: float = 0.0
    finish_reason: str | None = None
    tool_calls: list[FakeToolCall] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    cached_tokens: int = 0


@dataclass
class FakeScript:
    """What the fake model does. Fixed stats keep snapshots free of real timings."""

    reply: Callable[[str], str] = default_reply
    chunk_chars: int = 6  # characters per "token"
    delay: float = 0.005  # seconds between tokens
    load_delay: float = 0.0
    fail_load: str | None = None  # load raises RuntimeError(fail_load)
    fail_after_chunks: int | None = None  # raise mid-answer after this many tokens
    tool_call_word: str = "weather"  # a message with this word gets a tool call
    prefill_delay: float = 0.0  # seconds per prompt chunk of 64 fake tokens
    context_limit: int | None = 32768  # the fake model's max_position_embeddings
    ttft: float | None = 0.25  # reported time to first token; None: the engine's measurement


class FakeSession:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        system: str | None = None,
        tools: list | None = None,
        script: FakeScript | None = None,
    ) -> None:
        self.script = script or FakeScript()
        self.system = system  # kept apart from the turns, as ChatSession does
        self.messages: list[dict[str, Any]] = []
        self.documents: list[dict[str, str]] | None = None
        self._held = ""  # what the "cache" holds: the rendered conversation so far
        self.last_prefill_tokens = 0

    def _rendered(self, messages: list[dict[str, Any]]) -> str:
        """The conversation as one string: a prefix of it is what a cache can reuse."""
        parts = [f"system:{self.system}"] if self.system else []
        parts += [f"doc:{d['title']}:{d['text']}" for d in self.documents or []]
        parts += [f"{m['role']}:{m.get('content') or ''}" for m in messages]
        return "\n".join(parts) + "\n"

    @property
    def context_tokens(self) -> int:
        return fake_tokens(self._held)

    def set_system(self, text: str | None) -> None:
        self.system = text

    def send(self, user_text: str, **opts: Any) -> Iterator[FakeResponse]:
        self.messages.append({"role": "user", "content": user_text})
        return self._answer(user_text, **opts)

    def regenerate(self, **opts: Any) -> Iterator[FakeResponse]:
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        user = next(m for m in reversed(self.messages) if m["role"] == "user")
        return self._answer(user["content"], **opts)

    def edit_last(self, new_user_text: str, **opts: Any) -> Iterator[FakeResponse]:
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        self.messages[-1] = {"role": "user", "content": new_user_text}
        return self._answer(new_user_text, **opts)

    def _answer(
        self,
        user_text: str,
        max_tokens: int = 1024,
        cancel: threading.Event | None = None,
        prompt_progress: Callable[[int, int], None] | None = None,
        **options: Any,
    ) -> Iterator[FakeResponse]:
        self.last_options = dict(options, max_tokens=max_tokens)  # what the app asked for
        script = self.script
        text = script.reply(user_text)
        if self.documents:
            titles = ", ".join(d["title"] for d in self.documents)
            text = f"I read {len(self.documents)} document(s): {titles}.\n\n" + text
        chunks = [text[i : i + script.chunk_chars] for i in range(0, len(text), script.chunk_chars)]
        # Prefill: only what the held conversation does not already start with.
        prompt = self._rendered(self.messages)
        common = 0
        while common < min(len(prompt), len(self._held)) and prompt[common] == self._held[common]:
            common += 1
        cached, total = fake_tokens(prompt[:common]), fake_tokens(prompt)
        prompt_tokens = total - cached
        self.last_prefill_tokens = prompt_tokens
        for done in range(0, prompt_tokens, 64):
            if script.prefill_delay:
                time.sleep(script.prefill_delay)
            if prompt_progress is not None:
                prompt_progress(done, prompt_tokens)
        if prompt_progress is not None:
            prompt_progress(prompt_tokens, prompt_tokens)
        self._held = prompt
        answer: list[str] = []
        finish = "stop"
        for n, chunk in enumerate(chunks):
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if n >= max_tokens:
                finish = "length"
                break
            if script.fail_after_chunks is not None and n >= script.fail_after_chunks:
                raise RuntimeError("the fake model failed on purpose")
            if script.delay:
                time.sleep(script.delay)
            answer.append(chunk)
            yield self._response(chunk, None, prompt_tokens, len(answer), cached=cached)
        calls = []
        if finish == "stop" and script.tool_call_word in user_text.lower():
            calls = [FakeToolCall("get_weather", {"city": "Paris"}, '{"name": "get_weather"}')]
            # As GenerationResponse does: the call on the step that completes it, and
            # again in the final response's complete list.
            yield self._response("", None, prompt_tokens, len(answer), calls, cached)
        assistant: dict[str, Any] = {"role": "assistant", "content": "".join(answer)}
        if calls:
            assistant["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in calls]
        self.messages.append(assistant)
        self._held = self._rendered(self.messages)
        yield self._response("", finish, prompt_tokens, len(answer), calls, cached)

    @staticmethod
    def _response(
        text: str,
        finish: str | None,
        prompt_tokens: int,
        generated: int,
        calls: list[FakeToolCall] | None = None,
        cached: int = 0,
    ) -> FakeResponse:
        return FakeResponse(
            text=text,
            token=None if finish else generated,
            finish_reason=finish,
            tool_calls=calls or [],
            prompt_tokens=prompt_tokens,
            prompt_tps=512.0,
            generation_tokens=generated,
            generation_tps=64.0,
            peak_memory=0.75,
            cached_tokens=cached,
        )

    def save(self, path: str | Path) -> None:
        saved = {"system": self.system, "messages": self.messages, "held": self._held}
        Path(path).write_text(json.dumps(saved))

    @classmethod
    def load(cls, path: str | Path, model: Any, tokenizer: Any) -> FakeSession:
        saved = json.loads(Path(path).read_text())
        session = cls(model, tokenizer, system=saved["system"])
        session.messages = saved["messages"]
        session._held = saved.get("held", "")
        session.loaded_from = str(path)  # lets tests see that the saved file was used
        return session

    @classmethod
    def from_messages(
        cls, model: Any, tokenizer: Any, messages: list[dict[str, Any]], system: str | None = None
    ) -> FakeSession:
        history = [dict(m) for m in messages]
        if history and history[0]["role"] == "system":
            first = history.pop(0)
            system = first["content"] if system is None else system
        session = cls(model, tokenizer, system=system)
        session.messages = history
        return session


class FakeEngine(EngineThread):
    def __init__(self, emit: Callable[[Event], None], script: FakeScript | None = None) -> None:
        super().__init__(emit)
        self.script = script or FakeScript()

    def load_model(self, model: str) -> tuple[Any, Any, Any]:
        if self.script.load_delay:
            time.sleep(self.script.load_delay)
        if self.script.fail_load:
            raise RuntimeError(self.script.fail_load)
        script = self.script

        class ScriptedSession(FakeSession):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, script=script, **kwargs)

        class FakeModel:
            class args:  # as granite_mlx's Model.args
                max_position_embeddings = script.context_limit

        return FakeModel(), object(), ScriptedSession

    def _ttft(self, measured: float | None) -> float | None:
        return measured if self.script.ttft is None else self.script.ttft

    @property
    def session(self) -> Any:
        """The current session (tests only; read it while the engine is idle)."""
        return self._session
