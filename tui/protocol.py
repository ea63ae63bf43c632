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
    """How to sample an answer; the fields map onto ChatSession's keyword options.

    Each chat keeps its own; new chats start from the app-wide defaults, which start
    as the values below.
    """

    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0  # 1.0 disables nucleus sampling
    top_k: int = 0  # 0 disables top-k
    min_p: float = 0.0  # 0 disables min-p
    repetition_penalty: float | None = None  # None (or 1.0) disables it
    max_tokens: int = 1024  # answer length limit
    seed: int | None = None  # None: a fresh random seed per answer

    def as_options(self) -> dict[str, Any]:
        options = asdict(self)
        for name in ("seed", "repetition_penalty"):
            if options[name] is None:
                del options[name]
        return options

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SamplingSettings:
        """Build from stored JSON, ignoring keys an older or newer version wrote, and
        falling back to the defaults if the values do not make valid settings."""
        known = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        try:
            settings = cls(**known)
        except TypeError:
            return cls()
        return cls() if settings.problem() else settings

    def problem(self) -> str | None:
        """What is wrong with these settings, as a sentence naming the field; None if valid."""

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        def whole(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not number(self.temperature) or not 0 <= self.temperature <= 5:
            return "Temperature must be a number from 0 to 5 (0 = greedy)."
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            return "Top p must be above 0 and at most 1 (1 = off)."
        if not whole(self.top_k) or self.top_k < 0:
            return "Top k must be a whole number, 0 or more (0 = off)."
        if not number(self.min_p) or not 0 <= self.min_p < 1:
            return "Min p must be from 0 up to (not including) 1 (0 = off)."
        penalty = self.repetition_penalty
        if penalty is not None and (not number(penalty) or not 0 < penalty <= 10):
            return "Repetition penalty must be above 0 and at most 10 (empty or 1 = off)."
        if not whole(self.max_tokens) or self.max_tokens < 1:
            return "Max tokens must be a whole number, 1 or more."
        if self.seed is not None and (not whole(self.seed) or not 0 <= self.seed < 2**63):
            return "Seed must be a whole number from 0 to 2^63 - 1 (empty = random)."
        return None


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
    """The numbers shown in an answer's footer (and kept with it in the database)."""

    prompt_tokens: int  # prompt tokens prefilled for this answer
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    ttft: float | None = None  # seconds from the request to the first token
    cached_tokens: int | None = None  # prompt tokens reused from the cache (None: unknown)
    context_tokens: int | None = None  # the conversation's tokens after this answer

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> GenerationStats | None:
        """From stored JSON; the later fields are missing from older answers."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError:  # a required field is missing
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

    ``messages`` are ChatSession-style dicts, ``documents`` {"title", "text"} dicts. The
    session is built lazily on the next answer: from ``session_path`` when that file
    matches the history, else by prefilling. With ``same_chat`` (the open chat changed:
    another answer variant shown, documents attached, the cache file turned off) a live
    session is kept and given the new history, so the library reuses what its cache
    still holds.
    """

    messages: tuple[dict[str, Any], ...] = ()
    system: str | None = None
    session_path: str | None = None  # where to save the session after each answer
    documents: tuple[dict[str, str], ...] = ()
    same_chat: bool = False


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
    unit: Literal["B", "step"] = "B"  # bytes downloaded, or loading steps done


@dataclass(frozen=True)
class Loaded:
    model: str
    context_limit: int | None = None  # the model's trained context (max_position_embeddings)


@dataclass(frozen=True)
class LoadFailed:
    message: str  # already phrased for the user, with what to do about it


@dataclass(frozen=True)
class PromptProgress:
    """The prompt is being read (prefilled): ``processed`` of ``total`` tokens."""

    request_id: int
    processed: int
    total: int


@dataclass(frozen=True)
class Token:
    """New answer text (possibly several tokens, batched) and any completed tool calls."""

    request_id: int
    text: str
    tool_calls: tuple[ToolCallInfo, ...] = ()
    generation_tokens: int = 0  # tokens so far, and the live rate
    generation_tps: float = 0.0


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


Event = LoadProgress | Loaded | LoadFailed | PromptProgress | Token | Done | Error


class Engine(Protocol):
    """What the app needs from an engine: the real one and the fake one both fit."""

    def start(self) -> None: ...

    def submit(self, request: Request) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


EngineFactory = Callable[[Callable[[Event], None]], Engine]
