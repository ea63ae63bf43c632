"""The engine thread: loads the model, owns the ChatSession, answers requests in order.

MLX streams belong to the thread that made them: a model loaded on one thread and run
on a fresh worker per message fails. So one long-lived thread does every MLX call (the
load, the prefill, each answer) and the app only posts requests to its queue and reads
events back. ``Cancel`` is the one request that skips the queue: it must reach an
answer that is running, and the queue is not read until that answer ends.

The protocol lives in ``protocol.py``; ``EngineThread`` is shared by the real engine
here and the scripted one in ``fake_engine.py``, so the tests exercise this code too.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .protocol import (
    Cancel,
    Done,
    EditLast,
    Error,
    Event,
    GenerationStats,
    Load,
    Loaded,
    LoadFailed,
    LoadProgress,
    OpenChat,
    PromptProgress,
    Regenerate,
    Request,
    SamplingSettings,
    Send,
    SetSystem,
    Shutdown,
    Token,
    ToolCallInfo,
)

DEFAULT_MODEL = "ibm-granite/granite-4.0-h-350m"

# Files a checkpoint needs (if the library does not say); the Hub repo also holds READMEs.
_CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "tokenizer*"]

# Batch tokens into one event per interval: a fast model posting one message per token
# would keep the UI busy rendering and slow its answer to key presses.
TOKEN_FLUSH_SECONDS = 1 / 30


class ModelUnavailable(Exception):
    """The model can be neither found locally nor downloaded; the text says what to do."""


class EngineNotReady(Exception):
    pass


LOCAL_FOLDER_HINT = (
    "To use a model that is already on disk, pass its folder: "
    "granite-mlx chat --model /path/to/folder "
    "(the folder that holds config.json, the *.safetensors weights and the tokenizer files)."
)


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1


def resolve_model(
    model: str, progress: Callable[[str, float, float | None], None] | None = None
) -> str:
    """Return a local folder for ``model``: the folder itself, the Hub cache, or a download.

    Raises ModelUnavailable with a message for the user when none of those works.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelUnavailable(f"{model} is a file; the model must be a folder.")
        return str(path)
    if _looks_like_path(model):
        raise ModelUnavailable(f"There is no folder at {model}.\n{LOCAL_FOLDER_HINT}")

    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    try:  # the same files the library's own loader fetches
        from granite_mlx.loading import HUB_FILES as patterns
    except ImportError:
        patterns = _CHECKPOINT_FILES

    # Cached: no network at all. Any failure here just means "download it".
    with contextlib.suppress(Exception):
        return snapshot_download(model, allow_patterns=patterns, local_files_only=True)
    try:
        return snapshot_download(
            model,
            allow_patterns=patterns,
            tqdm_class=_progress_bar_class(progress) if progress else None,
        )
    except GatedRepoError as exc:
        raise ModelUnavailable(
            f"{model} is a gated model on the Hugging Face Hub: accept its terms on the "
            f"model page and log in (hf auth login).\n{LOCAL_FOLDER_HINT}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelUnavailable(
            f"{model} is neither a local folder nor a model on the Hugging Face Hub.\n"
            f"{LOCAL_FOLDER_HINT}"
        ) from exc
    except Exception as exc:
        raise ModelUnavailable(
            f"Could not download {model}: the Hugging Face Hub cannot be reached "
            f"({type(exc).__name__}) and the model is not in the local cache.\n"
            f"Connect to the internet once so it can be downloaded.\n{LOCAL_FOLDER_HINT}"
        ) from exc


def _progress_bar_class(report: Callable[[str, float, float | None], None]) -> type:
    """A tqdm class that reports byte progress to ``report`` instead of drawing it."""
    from granite_mlx.hub_cache import reporting_progress_class

    return reporting_progress_class(report)


def _same_history(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Whether two histories hold the same turns (system prompts compared separately)."""

    def turns(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [
            (m.get("role", ""), m.get("content") or "")
            for m in messages
            if m.get("role") != "system"
        ]

    return turns(a) == turns(b)


def _system_of(session: Any) -> str | None:
    """The session's system prompt: its ``system`` attribute, else a system message."""
    if hasattr(session, "system"):
        return session.system
    for message in session.messages:
        if message.get("role") == "system":
            return message.get("content")
    return None


def _tool_call_info(call: Any) -> ToolCallInfo:
    return ToolCallInfo(
        name=str(getattr(call, "name", "") or "?"),
        arguments=dict(getattr(call, "arguments", None) or {}),
        raw=str(getattr(call, "raw", "") or ""),
        valid=bool(getattr(call, "valid", True)),
        error=(str(call.error) if getattr(call, "error", None) else None),
    )


def _stats_of(
    response: Any, ttft: float | None, cached: int | None, context: int | None
) -> GenerationStats | None:
    try:
        return GenerationStats(
            prompt_tokens=int(response.prompt_tokens),
            prompt_tps=float(response.prompt_tps),
            generation_tokens=int(response.generation_tokens),
            generation_tps=float(response.generation_tps),
            peak_memory=float(response.peak_memory),
            ttft=ttft,
            cached_tokens=cached,
            context_tokens=context,
        )
    except (AttributeError, TypeError, ValueError):
        return None


# How often prompt progress is reported: enough for a moving counter, not a flood.
PROMPT_PROGRESS_SECONDS = 0.1



class EngineThread(threading.Thread):
    """Runs requests one at a time on a single thread; subclasses say how to load."""

    def __init__(self, emit: Callable[[Event], None]) -> None:
        super().__init__(name="granite-engine", daemon=True)
        self._emit = emit
        self._requests: queue.Queue[Request] = queue.Queue()
        # One flag per answer, made at submit time, so an Esc pressed before the engine
        # picks the answer up still stops it.
        self._cancel_flags: dict[int, threading.Event] = {}
        self._flags_lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._session_class: Any = None
        self._session: Any = None
        self._chat = OpenChat()
        self._not_ready = "The model is still loading."
        # Speculative decoding options for every answer (`granite-mlx chat --draft-model
        # / --prompt-lookup`), set by the app before start. A draft model given as a
        # path is loaded once, here on the engine thread, at the first answer.
        self.drafting: dict[str, Any] = {}

    # --- called from the app's thread ---------------------------------------------------

    def submit(self, request: Request) -> None:
        if isinstance(request, (Cancel, Shutdown)):
            with self._flags_lock:
                for flag in self._cancel_flags.values():
                    flag.set()
            if isinstance(request, Cancel):
                return
        elif isinstance(request, (Send, Regenerate, EditLast)):
            with self._flags_lock:
                self._cancel_flags[request.request_id] = threading.Event()
        self._requests.put(request)

    # --- subclass hooks (run on the engine thread) --------------------------------------

    def load_model(self, model: str) -> tuple[Any, Any, Any]:
        """Return (model, tokenizer, ChatSession class) for ``model``."""
        raise NotImplementedError

    def describe_load_error(self, model: str, exc: BaseException) -> str:
        return f"Could not load {model}: {type(exc).__name__}: {exc}"

    # --- the engine thread ----------------------------------------------------------------

    def run(self) -> None:
        while True:
            request = self._requests.get()
            if isinstance(request, Shutdown):
                return
            try:
                self._handle(request)
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the thread
                request_id = getattr(request, "request_id", None)
                self._emit(Error(request_id, f"{type(exc).__name__}: {exc}"))

    def _handle(self, request: Request) -> None:
        if isinstance(request, Load):
            self._load(request.model)
        elif isinstance(request, OpenChat):
            self._open_chat(request)
        elif isinstance(request, SetSystem):
            self._chat = OpenChat(self._chat.messages, request.text, self._chat.session_path)
            if self._session is not None:
                self._session.set_system(request.text)
        elif isinstance(request, Send):
            self._answer(request.request_id, request.settings, "send", request.text)
        elif isinstance(request, Regenerate):
            self._answer(request.request_id, request.settings, "regenerate")
        elif isinstance(request, EditLast):
            self._answer(request.request_id, request.settings, "edit_last", request.text)

    def _open_chat(self, request: OpenChat) -> None:
        session = self._session
        self._chat = request
        if not request.same_chat or session is None:
            self._session = None  # built on the next answer
            return
        # The same conversation, edited: the live session keeps its cache (and its
        # snapshots), and the library re-prefills only from where the history changed.
        session.messages = [dict(m) for m in request.messages]
        if _system_of(session) != request.system:
            session.set_system(request.system)
        self._apply_documents(session, request.documents)

    def _load(self, model: str) -> None:
        # Let go of the current model first: two models need not fit in memory at once.
        self._model = self._tokenizer = self._session = None
        try:
            self._model, self._tokenizer, self._session_class = self.load_model(model)
        except Exception as exc:  # noqa: BLE001 - any failure becomes a message for the user
            self._model = None
            self._not_ready = self.describe_load_error(model, exc)
            self._emit(LoadFailed(self._not_ready))
            return
        args = getattr(self._model, "args", None)
        limit = getattr(args, "max_position_embeddings", None)
        self._emit(Loaded(model, limit if isinstance(limit, int) else None))

    @staticmethod
    def _apply_documents(session: Any, documents: tuple[dict[str, str], ...]) -> None:
        """Give the session the chat's documents (ChatSession's ``documents`` attribute,
        rendered into every turn's prompt by the chat format)."""
        session.documents = [dict(d) for d in documents] or None

    def _ensure_session(self) -> Any:
        if self._model is None:
            raise EngineNotReady(self._not_ready)
        if self._session is not None:
            return self._session
        chat = self._chat
        history = [dict(m) for m in chat.messages]
        session = None
        if chat.session_path and Path(chat.session_path).exists():
            try:
                saved = self._session_class.load(chat.session_path, self._model, self._tokenizer)
                if _same_history(saved.messages, history):
                    session = saved
                    if _system_of(saved) != chat.system:
                        session.set_system(chat.system)
            except Exception:  # noqa: BLE001 - stale or damaged file: prefill the history instead
                session = None
        if session is None:
            session = self._session_class.from_messages(
                self._model, self._tokenizer, history, system=chat.system
            )
        self._apply_documents(session, chat.documents)
        self._session = session
        return session

    def _drafting(self) -> dict[str, Any]:
        draft = self.drafting.get("draft_model")
        if isinstance(draft, str):
            from granite_mlx import load

            self.drafting = {**self.drafting, "draft_model": load(draft)}  # (model, tokenizer)
        return self.drafting

    def _answer(
        self, request_id: int, settings: SamplingSettings, kind: str, text: str = ""
    ) -> None:
        with self._flags_lock:
            cancel = self._cancel_flags.setdefault(request_id, threading.Event())
        started = time.monotonic()
        reported_at = 0.0

        def prompt_progress(processed: int, total: int) -> None:
            nonlocal reported_at
            now = time.monotonic()
            if processed >= total or now - reported_at >= PROMPT_PROGRESS_SECONDS:
                reported_at = now
                self._emit(PromptProgress(request_id, int(processed), int(total)))

        try:
            # Even when Esc came before this answer started, the session runs it: it ends
            # at once as "cancelled" and records the (empty) answer, as the app does.
            try:
                session = self._ensure_session()
            except EngineNotReady as exc:
                self._emit(Error(request_id, str(exc)))
                return
            options = dict(
                settings.as_options(), **self._drafting(), cancel=cancel,
                prompt_progress=prompt_progress,
            )  # fmt: skip
            if kind == "send":
                responses = session.send(text, **options)
            elif kind == "regenerate":
                responses = session.regenerate(**options)
            else:
                responses = session.edit_last(text, **options)
            self._stream(request_id, responses, cancel, started)
        finally:
            with self._flags_lock:
                self._cancel_flags.pop(request_id, None)

    def _stream(
        self, request_id: int, responses: Iterator[Any], cancel: threading.Event, started: float
    ) -> None:
        pending: list[str] = []
        last: Any = None
        first_token_at: float | None = None
        flushed_at = time.monotonic()

        def flush(tool_calls: tuple[ToolCallInfo, ...] = ()) -> None:
            nonlocal flushed_at
            if pending or tool_calls:
                tokens = int(getattr(last, "generation_tokens", 0) or 0)
                tps = float(getattr(last, "generation_tps", 0.0) or 0.0)
                self._emit(Token(request_id, "".join(pending), tool_calls, tokens, tps))
                pending.clear()
            flushed_at = time.monotonic()

        shown_calls = 0
        try:
            for response in responses:
                last = response
                if first_token_at is None and getattr(response, "token", None) is not None:
                    first_token_at = time.monotonic()
                if response.text:
                    pending.append(response.text)
                calls = tuple(_tool_call_info(c) for c in (response.tool_calls or ()))
                if response.finish_reason:
                    # The final response lists every call of the answer: show the new ones.
                    calls = calls[shown_calls:]
                shown_calls += len(calls)
                if calls or time.monotonic() - flushed_at >= TOKEN_FLUSH_SECONDS:
                    flush(calls)
        except Exception as exc:  # noqa: BLE001 - shown in the answer; the app goes on
            flush()  # show what arrived before the failure
            self._session = None  # its state is unknown; the app reopens the chat
            self._emit(Error(request_id, f"{type(exc).__name__}: {exc}"))
            return
        flush()
        finish = getattr(last, "finish_reason", None)
        if finish not in ("stop", "length", "cancelled"):
            finish = "cancelled" if cancel.is_set() else "stop"
        session = self._session
        tool_calls = None
        stats = None
        if session is not None and session.messages:
            answer = session.messages[-1]
            if answer.get("role") == "assistant":
                tool_calls = answer.get("tool_calls")
            self._chat = OpenChat(
                tuple(session.messages),
                self._chat.system,
                self._chat.session_path,
                self._chat.documents,
            )
            self._save_session(session)
        if last is not None:
            ttft = self._ttft(first_token_at - started if first_token_at is not None else None)
            stats = _stats_of(last, ttft, *self._token_counts(session, last))
        self._emit(Done(request_id, stats, finish, tool_calls))

    def _ttft(self, measured: float | None) -> float | None:
        """Time to first token as reported (the scripted engine fixes it for snapshots)."""
        return measured

    @staticmethod
    def _token_counts(session: Any, last: Any) -> tuple[int | None, int | None]:
        """(prompt tokens reused from the cache, the conversation's tokens after the
        answer), as GenerationResponse and ChatSession report them."""
        cached = getattr(last, "cached_tokens", None)
        context = getattr(session, "context_tokens", None) if session is not None else None
        return (
            int(cached) if cached is not None else None,
            int(context) if context is not None else None,
        )

    def _save_session(self, session: Any) -> None:
        if not self._chat.session_path:
            return
        # Only a speed-up: if saving fails, reopening prefills the history instead.
        with contextlib.suppress(Exception):
            path = Path(self._chat.session_path)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            session.save(path)
            os.chmod(path, 0o600)  # it holds the conversation: the user's alone


class RealEngine(EngineThread):
    """The engine around granite_mlx's load_model, tokenizer and ChatSession."""

    def load_model(self, model: str) -> tuple[Any, Any, Any]:
        def report(description: str, completed: float, total: float | None) -> None:
            self._emit(LoadProgress(description, completed, total))

        path = resolve_model(model, progress=report)
        # Imported here: only the real engine needs the generation layer, and everything
        # it does with MLX from here on happens on this thread.
        from granite_mlx import load_model
        from granite_mlx.session import ChatSession
        from granite_mlx.tokenizer import load_tokenizer

        self._emit(LoadProgress("Reading the weights", 0, 2, "step"))
        loaded_model = load_model(path)
        self._emit(LoadProgress("Reading the tokenizer", 1, 2, "step"))
        tokenizer = load_tokenizer(path)
        self._emit(LoadProgress("Ready", 2, 2, "step"))
        return loaded_model, tokenizer, ChatSession

    def describe_load_error(self, model: str, exc: BaseException) -> str:
        from granite_mlx.errors import GraniteError

        if isinstance(exc, ModelUnavailable):
            return str(exc)
        if isinstance(exc, GraniteError):  # the library's own message already says why
            return f"Could not load {model}: {exc}\n{LOCAL_FOLDER_HINT}"
        return super().describe_load_error(model, exc)
