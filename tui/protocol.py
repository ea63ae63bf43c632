"""The messages between the chat app and its engine thread.

The app sends requests with ``engine.submit(request)`` and receives events through the
``emit`` callback it gave the engine. Both sides are plain dataclasses, so the app never
touches MLX objects and a scripted fake engine can stand in for the real one in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample an answer; the fields map onto ChatSession's keyword options."""

    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0  # 1.0 disables nucleus sampling
    top_k: int = 0  # 0 disables top-k
    max_tokens: int = 1024  # answer length limit
    seed: int | None = None  # None: a fresh random seed per answer

    def as_options(self) -> dict[str, Any]:
        options = asdict(self)
        if options["seed"] is None:
            del options["seed"]
        return options

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SamplingSettings:
        """Build from stored JSON, ignoring keys an older or newer version wrote."""
        known = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class ToolCallInfo:
    """A tool call as the UI shows it (a copy of granite_mlx.tool_calls.ToolCall)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""
    valid: bool = True
    error: str | None = None


@dataclass(frozen=True)
class GenerationStats:
    """The numbers shown in an answer's footer."""

    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> GenerationStats | None:
        if not data:
            return None
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None


# --- requests (app -> engine) ---------------------------------------------------------


@dataclass(frozen=True)
class Load:
    model: str  # local folder or Hugging Face repo id


@dataclass(frozen=True)
class Send:
    request_id: int
    text: str
    settings: SamplingSettings = SamplingSettings()


@dataclass(frozen=True)
class Regenerate:
    request_id: int
    settings: SamplingSettings = SamplingSettings()


@dataclass(frozen=True)
class EditLast:
    request_id: int
    text: str
    settings: SamplingSettings = SamplingSettings()


@dataclass(frozen=True)
class Cancel:
    """Stop the running answer (and any queued one); handled at once, not queued."""


@dataclass(frozen=True)
class SetSystem:
    text: str | None


@dataclass(frozen=True)
class OpenChat:
    """Make this history the engine's conversation (a new chat is an empty one).

    ``messages`` are ChatSession-style dicts. The session is built lazily on the next
    answer: from ``session_path`` when that file matches the history, else by prefilling.
    """

    messages: tuple[dict[str, Any], ...] = ()
    system: str | None = None
    session_path: str | None = None  # where to save the session after each answer


@dataclass(frozen=True)
class Shutdown:
    pass


Request = Load | Send | Regenerate | EditLast | Cancel | SetSystem | OpenChat | Shutdown


# --- events (engine -> app) -----------------------------------------------------------


@dataclass(frozen=True)
class LoadProgress:
    description: str
    completed: float
    total: float | None


@dataclass(frozen=True)
class Loaded:
    model: str


@dataclass(frozen=True)
class LoadFailed:
    message: str  # already phrased for the user, with what to do about it


@dataclass(frozen=True)
class Token:
    """New answer text (possibly several tokens, batched) and any completed tool calls."""

    request_id: int
    text: str
    tool_calls: tuple[ToolCallInfo, ...] = ()


@dataclass(frozen=True)
class Done:
    request_id: int
    stats: GenerationStats | None
    finish_reason: FinishReason
    # The answer's "tool_calls" entry exactly as the session keeps it, so that reopening
    # the chat can hand the same history back.
    history_tool_calls: list[Any] | None = None


@dataclass(frozen=True)
class Error:
    request_id: int | None  # None: not tied to an answer
    message: str


Event = LoadProgress | Loaded | LoadFailed | Token | Done | Error


class Engine(Protocol):
    """What the app needs from an engine: the real one and the fake one both fit."""

    def start(self) -> None: ...

    def submit(self, request: Request) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


EngineFactory = Callable[[Callable[[Event], None]], Engine]
