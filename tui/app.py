"""The terminal chat app: ``granite-chat`` / ``granite-mlx chat``.

The app owns the screen and the database; the engine thread owns the model. They talk
only through the dataclasses in ``protocol.py``: requests go in with ``engine.submit``,
events come back as ``EngineMessage`` posted onto the app's queue, so the UI never
waits on MLX. The database is the source of truth for a chat: whenever the engine's
state is in doubt (a failed answer, a retried turn) the app reopens the chat from it.

The keyboard model: the message box is home. Any printable key typed outside a
dialog goes there, Esc returns there (and stops an answer), choosing a chat returns
there, and the messages are one Tab stop (``Conversation``) rather than one per message.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import sqlite3
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from textual import events
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, ProgressBar, Static, TextArea

from granite_mlx.cli import ArgumentParser, finite_float, whole_number
from granite_mlx.errors import GraniteError

from .engine import DEFAULT_MODEL, RealEngine
from .export import export_chat
from .protocol import (
    Cancel,
    Done,
    EditLast,
    Engine,
    EngineFactory,
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
)
from .screens import (
    ConfirmScreen,
    KeysScreen,
    LineInputScreen,
    PickScreen,
    SettingsResult,
    SettingsScreen,
    TextEditScreen,
)
from .session_cache import DEFAULT_MAX_MB, SessionCache
from .store import (
    DB_NAME,
    Chat,
    ChatStore,
    StoredMessage,
    StoreError,
    default_data_dir,
    ensure_private_dir,
    history_for_session,
)
from .widgets import (
    ChatList,
    Conversation,
    MessageView,
    PromptInput,
    SystemPromptView,
    tool_calls_from_history,
)

# How often a streaming answer is written to the database, so that a crash or a quit
# loses at most this much of it.
SAVE_PARTIAL_SECONDS = 0.5

FINISH_STATUS = {"stop": "done", "length": "length", "cancelled": "stopped"}

# Under this many columns the chat list hides itself and the key bar goes compact;
# under the second, the key bar is one line of the main keys.
NARROW_COLUMNS = 80
NARROW_KEYLINE_COLUMNS = 60

# The context meter warns from this share of the model's context on.
CONTEXT_WARNING = 0.8

# A second Ctrl+C within this many seconds quits.
QUIT_AGAIN_SECONDS = 3.0

# Documents go into the prompt whole: refuse what cannot be meant as one.
MAX_DOCUMENT_BYTES = 2_000_000

ATTACH_COMMAND = "/attach"


class EngineMessage(Message):
    """An engine event, posted from the engine thread onto the app's queue."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


@dataclass
class StreamingTurn:
    """The answer being generated: which request, which database row, which widget."""

    request_id: int
    message_id: int
    view: MessageView
    saved_at: float
    reply_to: int | None = None  # the user message it answers


def chat_title(text: str, limit: int = 40) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "New chat")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def human_size(size: float) -> str:
    if size < 1000:
        return f"{size:.0f} B"
    if size < 1_000_000:
        return f"{size / 1000:.1f} KB"
    if size < 1_000_000_000:
        return f"{size / 1e6:.1f} MB"
    return f"{size / 1e9:.2f} GB"


def message_view(message: StoredMessage, variant: tuple[int, int] | None = None) -> MessageView:
    return MessageView(
        message.role,
        message.content,
        status=message.status,
        stats=GenerationStats.from_dict(message.stats),
        error=message.error,
        tool_calls=tool_calls_from_history(message.tool_calls),
        message_id=message.id,
        variant=variant,
    )


def normalize_model(model: str) -> str:
    """A local folder as its absolute path (so it is remembered once); else as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def read_document(path_text: str) -> tuple[str, str] | str:
    """(title, text) of a file to attach, or a sentence saying why it cannot be."""
    path = Path(path_text.strip()).expanduser()
    if not path.exists():
        return f"There is no file at {path}."
    if not path.is_file():
        return f"{path} is not a file."
    size = path.stat().st_size
    if size > MAX_DOCUMENT_BYTES:
        return (
            f"{path.name} is {human_size(size)}; documents go into the prompt whole, so at "
            f"most {human_size(MAX_DOCUMENT_BYTES)} can be attached."
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return f"{path.name} is not a text file (UTF-8): only text can be attached."
    except OSError as exc:
        return f"Cannot read {path}: {exc.strerror or exc}."
    return path.name, text


class GraniteChatApp(App[None]):
    CSS_PATH = "chat.tcss"
    TITLE = "granite-mlx chat"

    # Keys chosen to reach the app in macOS Terminal.app and iTerm2 with stock settings:
    # - no Ctrl+arrows: macOS takes Ctrl+Up/Down/Left/Right (Mission Control, App
    #   Exposé, Spaces) before the terminal sees them;
    # - no Option/Alt combinations: both terminals type a character for Option+key
    #   (Option+E starts an accent) unless "Use Option as Meta key" is switched on;
    # - no F-keys as the only way: on a Mac keyboard they are brightness and volume
    #   unless fn is held;
    # - nothing on Shift+Enter alone: both send the same byte as Enter, so a new line
    #   is Ctrl+J (a plain line feed, which every terminal sends);
    # - Ctrl+letters do arrive (Textual's raw mode turns off Ctrl+S/Ctrl+Q flow control
    #   and Ctrl+Z suspend), except that the message box keeps its editing keys
    #   (Ctrl+A/E/K/U/W/D/X/V/Z/Y). So edit-last is Up in an empty message box (as in
    #   Slack), a key every terminal sends as is.
    #
    # Tab is handled by the app itself (a priority binding), so focus moves the moment
    # the key arrives: keys typed right behind it (Tab, Down, Enter) then reach the new
    # focus, not the old one they would otherwise be routed to while Tab is in flight.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("tab", "move_focus(1)", show=False, priority=True),
        Binding("shift+tab", "move_focus(-1)", show=False, priority=True),
        Binding("escape", "stop", "Stop"),
        Binding("escape", "focus_prompt", show=False),  # when there is nothing to stop
        Binding("ctrl+c", "interrupt", show=False, priority=True),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+f", "search", "Search"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+b", "toggle_sidebar", "Chats"),
        Binding("f1", "keys", "Keys", show=False),
    ]

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        engine_factory: EngineFactory | None = None,
        data_dir: Path | None = None,
        export_dir: Path | None = None,
        system: str | None = None,
        sampling: dict[str, Any] | None = None,
        session_cache: bool | None = None,
        session_cache_mb: int | None = None,
        drafting: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.drafting = dict(drafting or {})  # speculative decoding options for every answer
        self.model_name = normalize_model(model)
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.sessions_dir = self.data_dir / "sessions"
        self.export_dir = Path(export_dir) if export_dir else Path.cwd()
        self.store = ChatStore(self.data_dir / DB_NAME)
        self.engine_factory: EngineFactory = engine_factory or RealEngine
        self.engine: Engine | None = None
        self.chat: Chat | None = None  # None: a new chat, not saved until its first message
        # Sampling: app-wide defaults (saved, then this run's command-line values), and
        # the open chat's own settings.
        saved = SamplingSettings.from_dict(self.store.get_setting("sampling_defaults"))
        self.defaults = replace(saved, **(sampling or {}))
        self.settings = self.defaults
        self.new_chat_system = system  # --system: the system prompt of new chats
        self.draft_system: str | None = system
        self.draft_documents: list[dict[str, str]] = []
        enabled = self.store.get_setting("session_cache", True)
        max_mb = session_cache_mb or self.store.get_setting("session_cache_max_mb", DEFAULT_MAX_MB)
        if not isinstance(max_mb, int) or max_mb <= 0:
            max_mb = DEFAULT_MAX_MB
        self.session_cache = SessionCache(
            self.sessions_dir,
            self.store,
            enabled=bool(enabled) if session_cache is None else session_cache,
            max_bytes=max_mb * 1_000_000,
        )
        self.turn: StreamingTurn | None = None
        self.model_state = "loading"  # loading | ready | failed
        self.model_error: str | None = None
        self.context_limit: int | None = None
        self.context_tokens: int | None = None
        self._context_warned = False
        self._request_ids = itertools.count(1)
        self._load_started = time.monotonic()
        self._download_start: tuple[float, float] | None = None  # (time, bytes) of the first report
        self._load_text = ""
        self._interrupt_at = 0.0
        self._prompt_widget: PromptInput | None = None
        self._checkpoint_timer: Any = None
        self.sidebar_choice: bool | None = None  # None: shown when the window is wide
        self.last_export: Path | None = None

    # --- layout -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            yield ChatList(self.choose_chat, id="sidebar")
            with Vertical(id="main"):
                with Vertical(id="banner"):
                    yield Static(id="banner-text", markup=False)
                    yield ProgressBar(id="banner-progress", show_eta=False)
                self._conversation = Conversation(id="conversation")
                yield self._conversation
                with Vertical(id="status"):
                    yield Static(id="read-only", markup=False)
                    yield Static(id="documents", markup=False)
                    yield Static(id="context", markup=False)
                self._prompt_widget = PromptInput(
                    id="prompt",
                    placeholder="Message · Enter sends · Ctrl+J new line · ↑ edits the last one",
                )
                yield self._prompt_widget
        yield Footer()
        yield Static(id="keyline", markup=False)  # the key bar of a narrow window

    # Kept by reference: a query by id walks the DOM, every Markdown block included.
    @property
    def conversation(self) -> Conversation:
        return self._conversation

    @property
    def prompt(self) -> PromptInput:
        assert self._prompt_widget is not None
        return self._prompt_widget

    async def on_mount(self) -> None:
        self.sub_title = f"{self.model_name} · loading"
        self.conversation.anchor()  # follow the answer until the user scrolls up
        self.store.mark_interrupted()
        await self.refresh_chat_list()
        if self.store.notice:
            self.notify(self.store.notice, title="Chat history", severity="warning", timeout=20)
        read_only = self.query_one("#read-only", Static)
        read_only.display = self.store.read_only
        read_only.update("The chat database is read-only: nothing you do here is saved.")
        self._notify_problems()
        if isinstance(draft := self.store.get_setting("draft"), str) and draft:
            self.prompt.load_text(draft)
            self.prompt.move_cursor(self.prompt.document.end)
        await self._show_system(self.draft_system)
        self._show_documents()
        self._show_banner(f"Loading {self.model_name}…")
        self.query_one("#banner-progress").display = False
        self._fit_width(self.size.width)
        self.prompt.focus()
        self.set_interval(0.5, self._tick_loading)
        self.engine = self.engine_factory(self._post_engine_event)
        if self.drafting:
            self.engine.drafting = dict(self.drafting)
        self.engine.start()
        self.engine.submit(Load(self.model_name))

    def _notify_problems(self) -> None:
        if self.store.problems:
            named = "; ".join(self.store.problems[:5])
            more = f" (and {len(self.store.problems) - 5} more)" if len(self.store.problems) > 5 else ""
            self.notify(
                f"Some saved data could not be read and is left out: {named}{more}.",
                title="Chat history",
                severity="warning",
                timeout=20,
            )
            self.store.problems.clear()

    def _show_banner(self, text: str, error: bool = False) -> None:
        banner = self.query_one("#banner")
        banner.display = True
        banner.set_class(error, "-error")
        self.query_one("#banner-text", Static).update(text)

    async def refresh_chat_list(self) -> None:
        chats = [(chat.id, chat.title) for chat in self.store.list_chats()]
        await self.query_one(ChatList).show(chats, self.chat.id if self.chat else None)

    def _submit(self, request: Request) -> None:
        if self.engine is not None:
            self.engine.submit(request)

    def _session_path(self, chat_id: int) -> str | None:
        return self.session_cache.path_for(chat_id, self.model_name)

    def on_resize(self, event: events.Resize) -> None:
        self._fit_width(event.size.width)

    def _fit_width(self, width: int) -> None:
        narrow = width < NARROW_COLUMNS
        self.query_one("#body").set_class(narrow, "-narrow")
        footer = self.query_one(Footer)
        footer.compact = narrow
        # Textual's footer gives every key an equal column: at 40 columns they overlap.
        # A narrow window gets one plain line with the few keys that matter most.
        footer.display = width >= NARROW_KEYLINE_COLUMNS
        keyline = self.query_one("#keyline", Static)
        keyline.display = not footer.display
        self._update_keyline()
        sidebar = self.query_one(ChatList)
        sidebar.display = (not narrow) if self.sidebar_choice is None else self.sidebar_choice

    def _update_keyline(self) -> None:
        keys = "esc stop · ^p commands · ^n new" if self.turn else "^p commands · ^n new · ^f search"
        self.query_one("#keyline", Static).update(keys)

    # --- what the chat shows besides messages -------------------------------------------

    async def _show_system(self, text: str | None) -> None:
        views = list(self.conversation.query_children(SystemPromptView))
        if not text:
            for view in views:
                await view.remove()
        elif views:
            views[0].set_text(text)
        else:
            await self.conversation.mount(SystemPromptView(text), before=0)

    def _documents(self) -> list[dict[str, str]]:
        if self.chat is None:
            return [{"title": d["title"], "text": d["text"]} for d in self.draft_documents]
        return [d.for_session() for d in self.store.documents(self.chat.id)]

    def _show_documents(self) -> None:
        docs = self._documents()
        bar = self.query_one("#documents", Static)
        bar.display = bool(docs)
        if docs:
            names = " · ".join(f"{d['title']} ({human_size(len(d['text'].encode()))})" for d in docs)
            bar.update(f"Documents: {names}")

    def _show_context(self) -> None:
        meter = self.query_one("#context", Static)
        tokens, limit = self.context_tokens, self.context_limit
        if tokens is None or not limit:
            meter.display = False
            return
        share = tokens / limit
        text = f"context {tokens:,} / {limit:,} tokens ({share:.0%})"
        if share >= 1:
            text += " · full: the model cannot take more; start a new chat (ctrl+n)"
        elif share >= CONTEXT_WARNING:
            text += " · nearly full: start a new chat (ctrl+n) before it runs out"
            if not self._context_warned:
                self._context_warned = True
                self.notify(
                    f"This chat uses {share:.0%} of the model's {limit:,}-token context. "
                    f"Past it, the model refuses to answer: start a new chat soon.",
                    title="Context nearly full",
                    severity="warning",
                    timeout=12,
                )
        meter.display = True
        meter.set_class(CONTEXT_WARNING <= share < 1, "-warning")
        meter.set_class(share >= 1, "-full")
        meter.update(text)

    # --- engine events ------------------------------------------------------------------

    def _post_engine_event(self, event: Event) -> None:
        """Called on the engine thread; post_message is thread-safe."""
        self.post_message(EngineMessage(event))

    async def on_engine_message(self, message: EngineMessage) -> None:
        event = message.event
        if isinstance(event, Token):
            await self._on_token(event)
        elif isinstance(event, PromptProgress):
            if turn := self._current_turn(event.request_id):
                turn.view.show_prompt_progress(event.processed, event.total)
        elif isinstance(event, Done):
            await self._on_done(event)
        elif isinstance(event, Error):
            await self._on_error(event)
        elif isinstance(event, LoadProgress):
            self._on_load_progress(event)
        elif isinstance(event, Loaded):
            self.model_state = "ready"
            self.context_limit = event.context_limit
            if Path(self.model_name).is_dir():
                self.store.remember_model(self.model_name)
            if self.turn is None:
                self.sub_title = self.model_name
            self.query_one("#banner").display = False
            self._show_context()
        elif isinstance(event, LoadFailed):
            self.model_state = "failed"
            self.model_error = event.message
            self.sub_title = f"{self.model_name} · not loaded"
            self._show_banner(
                f"The model could not be loaded.\n{event.message}\n"
                f"Past chats can still be read, exported and deleted; "
                f"ctrl+p → Switch model to try another.",
                error=True,
            )
            self.query_one("#banner-progress").display = False

    def _on_load_progress(self, event: LoadProgress) -> None:
        bar = self.query_one("#banner-progress", ProgressBar)
        bar.display = True
        bar.update(total=event.total, progress=event.completed)
        if event.unit == "B":
            now = time.monotonic()
            if self._download_start is None:
                self._download_start = (now, event.completed)
            started, first = self._download_start
            speed = (event.completed - first) / (now - started) if now > started else 0.0
            total = f" of {human_size(event.total)}" if event.total else ""
            rate = f" · {human_size(speed)}/s" if speed > 0 else ""
            self._load_text = (
                f"Downloading {self.model_name}: {human_size(event.completed)}{total}{rate}"
            )
        else:
            step = f" ({event.completed:.0f}/{event.total:.0f})" if event.total else ""
            self._load_text = f"Loading {self.model_name}: {event.description.lower()}{step}"
        self._tick_loading()

    def _tick_loading(self) -> None:
        """While loading, the banner says for how long (the bar may sit on one step)."""
        if self.model_state != "loading":
            return
        elapsed = time.monotonic() - self._load_started
        text = self._load_text or f"Loading {self.model_name}…"
        self._show_banner(f"{text} · {elapsed:.0f} s")

    def _current_turn(self, request_id: int | None) -> StreamingTurn | None:
        # Events of an answer the app has already closed (e.g. after a quit) are dropped.
        if self.turn is not None and self.turn.request_id == request_id:
            return self.turn
        return None

    async def _on_token(self, event: Token) -> None:
        turn = self._current_turn(event.request_id)
        if turn is None:
            return
        await turn.view.append(event.text)
        turn.view.show_live_rate(event.generation_tokens, event.generation_tps)
        if event.tool_calls:
            await turn.view.add_tool_calls(event.tool_calls)
        now = time.monotonic()
        if now - turn.saved_at >= SAVE_PARTIAL_SECONDS:
            turn.saved_at = now
            try:
                self.store.update_message(turn.message_id, content=turn.view.content)
            except sqlite3.Error as exc:  # tried again at the next interval and at the end
                self.notify(f"Could not save the answer so far: {exc}", severity="warning")

    async def _on_done(self, event: Done) -> None:
        turn = self._current_turn(event.request_id)
        if turn is None:
            return
        status = FINISH_STATUS[event.finish_reason]
        tool_calls = event.history_tool_calls
        if tool_calls is None and turn.view.tool_calls:
            tool_calls = [{"name": c.name, "arguments": c.arguments} for c in turn.view.tool_calls]
        try:
            self.store.update_message(
                turn.message_id,
                content=turn.view.content,
                status=status,
                stats=asdict(event.stats) if event.stats else None,
                tool_calls=tool_calls,
            )
            if self.chat is not None:
                self.session_cache.saved(self.chat.id, self.model_name)
        except sqlite3.Error as exc:
            self.notify(f"Could not save the answer: {exc}", severity="error", timeout=10)
        try:
            await turn.view.finish(status, event.stats)
            if turn.reply_to is not None:
                self._show_variant_counter(turn.view, turn.reply_to)
            if event.stats is not None and event.stats.context_tokens is not None:
                self.context_tokens = event.stats.context_tokens
                self._show_context()
            await self.refresh_chat_list()  # its order follows the latest answer
        finally:
            self._turn_ended()

    def _show_variant_counter(self, view: MessageView, reply_to: int) -> None:
        variants = [m.id for m in self.store.variants(reply_to)]
        if len(variants) > 1 and view.message_id in variants:
            view.set_variant((variants.index(view.message_id) + 1, len(variants)))

    async def _on_error(self, event: Error) -> None:
        turn = self._current_turn(event.request_id)
        if turn is None:
            self.notify(event.message, title="Engine error", severity="error", timeout=10)
            return
        self.store.update_message(
            turn.message_id, content=turn.view.content, status="error", error=event.message
        )
        self._reopen_in_engine()  # the failed turn is left out of the model's history
        try:
            await turn.view.finish("error", error=event.message)
        finally:
            self._turn_ended()

    def _turn_ended(self) -> None:
        """The answer is saved and shown: the app takes new requests again."""
        self.turn = None
        if self.model_state == "ready":
            self.sub_title = self.model_name
        self.refresh_bindings()
        self._update_keyline()

    def _reopen_in_engine(self, same_chat: bool = False) -> None:
        documents = tuple(self._documents())
        if self.chat is None:
            self._submit(OpenChat((), self.draft_system, None, documents, same_chat))
            return
        messages = self.store.messages(self.chat.id)
        self._submit(
            OpenChat(
                tuple(history_for_session(messages)),
                self.chat.system,
                self._session_path(self.chat.id),
                documents,
                same_chat,
            )
        )

    # --- sending ------------------------------------------------------------------------

    def _refuse_if_busy(self, needs_model: bool = True) -> bool:
        """Notify and return True when a new answer cannot start now."""
        if self.turn is not None:
            self.notify("Still answering: press Esc to stop it first.", timeout=3)
            return True
        if needs_model and self.model_state != "ready":
            if self.model_state == "failed":
                self.notify(f"No model is loaded: {self.model_error}", severity="error", timeout=8)
            else:
                self.notify("The model is still loading; your message is kept.", timeout=4)
            return True
        return False

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if text.strip().startswith(ATTACH_COMMAND) and (
            text.strip() == ATTACH_COMMAND or text.strip()[len(ATTACH_COMMAND)].isspace()
        ):
            path = text.strip()[len(ATTACH_COMMAND) :].strip()
            if not path:
                self.action_attach()
            elif self._attach(path):
                self.prompt.clear()
            return
        if not text.strip() or self._refuse_if_busy():
            return
        self.prompt.clear()
        await self._send(text)

    def on_prompt_input_edit_last_requested(self) -> None:
        self.action_edit_last()

    async def _send(self, text: str) -> None:
        try:
            chat = await self._ensure_chat(text)
            row = self.store.add_message(chat.id, "user", text)
            await self._mount(MessageView("user", text, message_id=row.id))
            await self._start_turn(Send(next(self._request_ids), text, self.settings), row.id)
        except sqlite3.Error as exc:
            self.prompt.load_text(text)  # nothing typed is lost
            self.prompt.move_cursor(self.prompt.document.end)
            await self._store_failed(exc)

    async def _store_failed(self, exc: sqlite3.Error) -> None:
        """A write failed: say why; if another instance deleted this chat, start afresh."""
        if self.chat is not None and self.store.get_chat(self.chat.id) is None:
            title = self.chat.title
            await self._clear_to_new_chat()
            self.notify(
                f"“{title}” was deleted (by another granite-chat?). Your message is still in "
                f"the box: press Enter to send it in a new chat.",
                title="Chat deleted",
                severity="warning",
                timeout=12,
            )
        else:
            self.notify(f"Could not save: {exc}", title="Chat history", severity="error")

    async def _ensure_chat(self, first_text: str) -> Chat:
        """Save a new chat on its first message, and point the engine at its session file."""
        if self.chat is not None:
            if self.chat.model != self.model_name:
                self.store.update_chat(self.chat.id, model=self.model_name)
            return self.chat
        self.chat = self.store.create_chat(
            chat_title(first_text),
            system=self.draft_system,
            model=self.model_name,
            settings=asdict(self.settings),
        )
        for doc in self.draft_documents:
            self.store.add_document(self.chat.id, doc["title"], doc["text"], doc.get("source"))
        self.draft_documents = []
        self._reopen_in_engine(same_chat=True)
        await self.refresh_chat_list()
        return self.chat

    async def _mount(self, view: MessageView) -> None:
        await self.conversation.mount(view)

    async def _start_turn(self, request: Send | Regenerate | EditLast, reply_to: int) -> None:
        assert self.chat is not None
        row = self.store.add_message(
            self.chat.id, "assistant", "", status="streaming", reply_to=reply_to
        )
        view = MessageView("assistant", status="streaming", message_id=row.id)
        self.turn = StreamingTurn(request.request_id, row.id, view, time.monotonic(), reply_to)
        self.sub_title = f"{self.model_name} · answering (Esc stops)"
        self.refresh_bindings()
        self._update_keyline()
        await self._mount(view)
        self.conversation.anchor()  # a new answer: follow it again
        self._submit(request)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.turn is not None
        if action == "move_focus":  # dialogs and the palette keep their own Tab
            return self.screen is self.screen_stack[0]
        return True

    def action_move_focus(self, direction: int) -> None:
        focused = self.focused
        if isinstance(focused, MessageView) and isinstance(focused.parent, Conversation):
            focused.parent.focus_neighbour(direction)  # messages are not in the Tab order
        elif direction > 0:
            self.screen.focus_next()
        else:
            self.screen.focus_previous()

    def on_key(self, event: events.Key) -> None:
        """A key that reached the app without a widget taking it: if it is one the
        message box takes, give it to the box.

        So letters typed while the chat list or a message has focus are not lost, and
        neither are keys typed ahead while the focus was moving: the box consumes its
        own Enter and printable keys, so one of those arriving here with the box focused
        was routed to the widget that had the focus when it was typed. Dialogs keep
        their keys: this runs for the main screen only.
        """
        if self.screen is not self.screen_stack[0]:
            return
        focused = self.focused
        if event.key == "enter" and focused is self.prompt:
            event.stop()
            event.prevent_default()
            self.prompt.post_message(PromptInput.Submitted(self.prompt, self.prompt.text))
            return
        if not event.is_printable or not event.character:
            return
        if isinstance(focused, (Input, TextArea)) and focused is not self.prompt:
            return
        event.stop()
        event.prevent_default()
        self.screen.set_focus(self.prompt)  # now, not after the keys already queued
        self.prompt.insert(event.character)

    # --- actions ------------------------------------------------------------------------

    def action_focus_prompt(self) -> None:
        self.prompt.focus()

    def action_stop(self) -> None:
        if self.turn is not None:
            self._submit(Cancel())
            self.sub_title = f"{self.model_name} · stopping"
        self.prompt.focus()

    async def action_interrupt(self) -> None:
        """Ctrl+C: stop an answer; else copy a selection; else quit on a second press."""
        if self.turn is not None:
            self.action_stop()
            return
        focused = self.focused
        if isinstance(focused, (TextArea, Input)) and focused.selected_text:
            focused.action_copy()
            return
        if selected := self.screen.get_selected_text():
            self.copy_to_clipboard(selected)
            self.notify("Copied", timeout=2)
            return
        now = time.monotonic()
        if now - self._interrupt_at <= QUIT_AGAIN_SECONDS:
            await self.action_quit()
            return
        self._interrupt_at = now
        self.notify("Press Ctrl+C again to quit (or Ctrl+Q). Your chats are saved.", timeout=3)

    def action_keys(self) -> None:
        self.push_screen(KeysScreen())

    async def _clear_to_new_chat(self) -> None:
        self.chat = None
        self.draft_system = self.new_chat_system
        self.draft_documents = []
        self.settings = self.defaults
        self.context_tokens = 0 if self.context_limit else None
        self._context_warned = False
        await self.conversation.remove_children()
        await self._show_system(self.draft_system)
        self._show_documents()
        self._show_context()
        self._submit(OpenChat((), self.draft_system))
        await self.refresh_chat_list()

    async def action_new_chat(self) -> None:
        if self._refuse_if_busy(needs_model=False):
            return
        await self._clear_to_new_chat()
        self.prompt.focus()

    async def choose_chat(self, chat_id: int) -> None:
        """A chat chosen in the list: open it and go back to the message box."""
        if self.chat is None or self.chat.id != chat_id:
            await self.open_chat(chat_id)
        if self.size.width < NARROW_COLUMNS and self.sidebar_choice:
            self.sidebar_choice = None  # on a small screen the list gives the chat its room
            self._fit_width(self.size.width)
        self.screen.set_focus(self.prompt)

    async def open_chat(self, chat_id: int) -> None:
        """Show a saved chat and make it the engine's conversation (resumed lazily)."""
        if self._refuse_if_busy(needs_model=False):
            await self.refresh_chat_list()  # put the highlight back on the current chat
            return
        chat = self.store.get_chat(chat_id)
        if chat is None:
            await self.refresh_chat_list()
            return
        self.chat = chat
        self.settings = SamplingSettings.from_dict(chat.settings)
        messages = self.store.messages(chat.id)
        variants = self.store.variant_ids(chat.id)
        views = []
        for m in messages:
            ids = variants.get(m.reply_to or -1, [])
            views.append(message_view(m, (ids.index(m.id) + 1, len(ids)) if m.id in ids else None))
        await self.conversation.remove_children()
        await self._show_system(chat.system)
        await self.conversation.mount_all(views)
        self.conversation.anchor()
        last_stats = next(
            (GenerationStats.from_dict(m.stats) for m in reversed(messages) if m.stats), None
        )
        self.context_tokens = last_stats.context_tokens if last_stats else None
        self._context_warned = False
        self._show_context()
        self._show_documents()
        self._notify_problems()
        await self.refresh_chat_list()
        self._reopen_in_engine()

    def _views_from(self, message_id: int) -> list[MessageView]:
        return [
            view
            for view in self.conversation.query(MessageView)
            if view.message_id is not None and view.message_id >= message_id
        ]

    async def _drop_from(self, message_id: int) -> None:
        """Delete this message and all later ones, on screen and in the database."""
        assert self.chat is not None
        self.store.delete_messages_from(self.chat.id, message_id)
        for view in self._views_from(message_id):
            await view.remove()

    def _last_turn(self) -> tuple[StoredMessage | None, StoredMessage | None]:
        """The last user message and the answer after it (None when there is none)."""
        if self.chat is None:
            return None, None
        messages = self.store.messages(self.chat.id)
        for index in range(len(messages) - 1, -1, -1):
            if messages[index].role == "user":
                after = messages[index + 1] if index + 1 < len(messages) else None
                return messages[index], after
        return None, None

    async def _chat_still_there(self) -> bool:
        if self.chat is not None and self.store.get_chat(self.chat.id) is None:
            await self._store_failed(sqlite3.IntegrityError("the chat was deleted"))
            return False
        return True

    async def _retry(self, user: StoredMessage, text: str) -> None:
        """Ask again for a turn the model never saw whole (its answer failed)."""
        await self._drop_from(user.id)
        self._reopen_in_engine()
        await self._send(text)

    async def action_regenerate(self) -> None:
        if self._refuse_if_busy() or not await self._chat_still_there():
            return
        user, answer = self._last_turn()
        if user is None:
            self.notify("There is no answer to regenerate yet.", timeout=3)
            return
        if answer is None or answer.status == "error":
            await self._retry(user, user.content)
            return
        # The answer stays, as an earlier variant (Left/Right on the new one shows it).
        self.store.hide_message(answer.id, user.id)
        for view in self._views_from(answer.id):
            await view.remove()
        await self._start_turn(Regenerate(next(self._request_ids), self.settings), user.id)

    async def action_previous_variant(self) -> None:
        await self.action_variant(-1)

    async def action_next_variant(self) -> None:
        await self.action_variant(1)

    async def action_variant(self, step: int) -> None:
        """Show the previous / next variant of the last answer."""
        if self._refuse_if_busy(needs_model=False) or self.chat is None:
            return
        user, answer = self._last_turn()
        if user is None or answer is None or answer.role != "assistant":
            return
        variants = self.store.variants(user.id)
        ids = [m.id for m in variants]
        if answer.id not in ids or len(ids) < 2:
            self.notify("This answer has no other variants (ctrl+r makes one).", timeout=3)
            return
        index = ids.index(answer.id) + step
        if not 0 <= index < len(ids):
            return
        chosen = variants[index]
        self.store.show_variant(chosen.id)
        old = self._views_from(answer.id)
        view = message_view(chosen, (index + 1, len(ids)))
        await self.conversation.mount(view, after=old[0] if old else None)
        for stale in old:
            await stale.remove()
        view.focus()
        # Same chat, another answer: the engine keeps its cache up to the question.
        self._reopen_in_engine(same_chat=True)

    def action_edit_last(self) -> None:
        if self._refuse_if_busy():
            return
        user, answer = self._last_turn()
        if user is None:
            self.notify("There is no message to edit yet.", timeout=3)
            return

        async def edited(text: str | None) -> None:
            if text is None or not text.strip() or self.turn is not None:
                return
            if not await self._chat_still_there():
                return
            if answer is None or answer.status == "error":
                await self._retry(user, text)
                return
            assert self.chat is not None
            await self._drop_from(user.id + 1)  # its answers, variants included
            self.store.update_message(user.id, content=text)
            for view in self._views_from(user.id):
                await view.set_text(text)
            await self._start_turn(EditLast(next(self._request_ids), text, self.settings), user.id)

        self.push_screen(
            TextEditScreen("Edit your last message", user.content, "The answer is regenerated."),
            edited,
        )

    def action_system_prompt(self) -> None:
        current = self.chat.system if self.chat else self.draft_system

        async def saved(text: str | None) -> None:
            if text is None:
                return
            system = text.strip() or None
            if self.chat is not None:
                self.store.update_chat(self.chat.id, system=system)
                self.chat = self.store.get_chat(self.chat.id)
            else:
                self.draft_system = system
            self._submit(SetSystem(system))
            await self._show_system(system)
            self.notify("System prompt set" if system else "System prompt cleared", timeout=3)

        self.push_screen(
            TextEditScreen("System prompt", current or "", "Empty: no system prompt."), saved
        )

    def action_settings(self) -> None:
        def saved(result: SettingsResult | None) -> None:
            if result is None:
                return
            self.settings = result.settings
            if self.chat is not None:
                self.store.update_chat(self.chat.id, settings=asdict(result.settings))
            if result.as_default:
                self.defaults = result.settings
                self.store.set_setting("sampling_defaults", asdict(result.settings))
            where = "this chat and as the default" if result.as_default else "this chat"
            self.notify(f"Sampling settings saved for {where}", timeout=3)

        self.push_screen(SettingsScreen(self.settings, self.defaults), saved)

    # --- documents ------------------------------------------------------------------------

    def action_attach(self) -> None:
        def chosen(path: str | None) -> None:
            if path and path.strip():
                self._attach(path)

        self.push_screen(
            LineInputScreen(
                "Attach a file as a document",
                hint="A text file; it goes into the prompt (Granite's documents). "
                f"Or type {ATTACH_COMMAND} PATH in the message box.",
                placeholder="path/to/file.txt",
            ),
            chosen,
        )

    def _attach(self, path_text: str) -> bool:
        if self.turn is not None:
            self.notify("Still answering: press Esc to stop it first.", timeout=3)
            return False
        read = read_document(path_text)
        if isinstance(read, str):
            self.notify(read, title="Attach", severity="error", timeout=8)
            return False
        title, text = read
        source = str(Path(path_text.strip()).expanduser().resolve())
        if self.chat is None:
            self.draft_documents.append({"title": title, "text": text, "source": source})
        else:
            self.store.add_document(self.chat.id, title, text, source)
        self._show_documents()
        self._reopen_in_engine(same_chat=True)
        self.notify(f"Attached {title}: the next answer reads it.", timeout=4)
        return True

    def action_detach(self) -> None:
        if self.chat is None:
            docs = [(d["title"], n) for n, d in enumerate(self.draft_documents)]
        else:
            docs = [(d.title, d.id) for d in self.store.documents(self.chat.id)]
        if not docs:
            self.notify("No documents are attached to this chat.", timeout=3)
            return

        def chosen(value: int | None) -> None:
            if value is None:
                return
            if self.chat is None:
                del self.draft_documents[value]
            else:
                self.store.remove_document(value)
            self._show_documents()
            self._reopen_in_engine(same_chat=True)

        self.push_screen(
            PickScreen(
                "Detach a document",
                lambda q: [d for d in docs if q.lower() in d[0].lower()],
                placeholder="Type to filter",
            ),
            chosen,
        )

    # --- models -----------------------------------------------------------------------------

    def _model_choices(self, remembered: list[str]) -> list[tuple[str, str]]:
        """Model folders used before, then Granite models in the Hugging Face cache.

        Runs on a worker thread (it reads the disk), so it takes the store's list as is.
        """
        from granite_mlx.errors import GraniteError
        from granite_mlx.hub_cache import cached_models, format_size

        choices = []
        for name in remembered:
            folder = Path(name)
            if folder.is_dir():
                size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
                choices.append((f"{name}  (local folder, {format_size(size)})", name))
        try:
            for m in cached_models():
                label = f"{m.repo_id}  (Hugging Face cache, {format_size(m.size_on_disk)}, {m.weights})"
                choices.append((label, m.repo_id))
        except GraniteError as exc:
            self.call_from_thread(self.notify, str(exc), severity="warning")
        return [
            (label + ("  ← current" if value == self.model_name else ""), value)
            for label, value in choices
        ]

    async def action_switch_model(self) -> None:
        if self._refuse_if_busy(needs_model=False):
            return
        choices = await asyncio.to_thread(self._model_choices, self.store.remembered_models())

        def chosen(value: str | None) -> None:
            if value:
                self.switch_model(value)

        self.push_screen(
            PickScreen(
                "Switch model",
                lambda q: [c for c in choices if q.lower() in c[0].lower()],
                placeholder="Type to filter, or a model folder / Hub repo id",
                hint="Folders you used before and Granite models in the Hugging Face cache.",
                free_text=True,
                empty="None listed: type a folder or a Hub repo id and press Enter.",
            ),
            chosen,
        )

    def switch_model(self, model: str) -> None:
        if self._refuse_if_busy(needs_model=False):
            return
        model = normalize_model(model)
        if model == self.model_name and self.model_state == "ready":
            self.notify(f"{model} is already loaded.", timeout=3)
            return
        self.model_name = model
        self.model_state = "loading"
        self.model_error = None
        self._load_started = time.monotonic()
        self._download_start = None
        self._load_text = ""
        self.sub_title = f"{model} · loading"
        self._show_banner(f"Loading {model}…")
        self.query_one("#banner-progress").display = False
        self._submit(Load(model))
        self._reopen_in_engine()  # the chat goes on with the new model (its cache file is per model)

    # --- history ----------------------------------------------------------------------------

    def action_rename(self) -> None:
        if self.chat is None:
            self.notify("This chat is not saved yet: send a message first.", timeout=3)
            return
        chat = self.chat

        async def renamed(title: str | None) -> None:
            if title is None or not title.strip():
                return
            self.store.update_chat(chat.id, title=title.strip())
            if self.chat is not None and self.chat.id == chat.id:
                self.chat = self.store.get_chat(chat.id)
            await self.refresh_chat_list()

        self.push_screen(LineInputScreen("Rename chat", chat.title), renamed)

    def action_search(self) -> None:
        def options(query: str) -> list[tuple[str, int]]:
            if not query.strip():
                return [(chat.title, chat.id) for chat in self.store.list_chats()[:50]]
            return [
                (f"{hit.chat.title} — {hit.snippet}" if hit.snippet else hit.chat.title, hit.chat.id)
                for hit in self.store.search(query)
            ]

        async def chosen(chat_id: int | None) -> None:
            if chat_id is not None:
                await self.open_chat(chat_id)
            self.prompt.focus()

        mode = "full-text" if self.store.search_mode == "fts5" else "substring"
        self.push_screen(
            PickScreen(
                "Search chats",
                options,
                placeholder="Words in the title or the messages",
                hint=f"Matches every word ({mode} search).",
                empty="No chat has all these words.",
            ),
            chosen,
        )

    def _save_partial_answer(self) -> None:
        if self.turn is not None:
            self.store.update_message(self.turn.message_id, content=self.turn.view.content)

    def action_export(self) -> None:
        if self.chat is None:
            self.notify("Nothing to export yet.", timeout=3)
            return
        self._save_partial_answer()
        try:
            path = export_chat(
                self.chat,
                self.store.messages(self.chat.id),
                self.export_dir,
                self.store.documents(self.chat.id),
            )
        except (OSError, StoreError) as exc:
            self.notify(f"Export failed: {exc}", severity="error", timeout=8)
            return
        self.last_export = path
        self.notify(f"Exported to {path}", title="Export", timeout=8)

    def action_delete_chat(self) -> None:
        if self.chat is None:
            self.notify("This chat is not saved yet.", timeout=3)
            return
        if self._refuse_if_busy(needs_model=False):
            return
        chat = self.chat

        async def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            self.session_cache.remove(chat.id)
            if not self.store.delete_chat(chat.id):
                self._retry_checkpoint()
            if self.chat is not None and self.chat.id == chat.id:
                await self._clear_to_new_chat()
            await self.refresh_chat_list()
            self.notify(f"Deleted “{chat.title}”", timeout=3)

        self.push_screen(
            ConfirmScreen(f"Delete the chat “{chat.title}”? Its messages are erased."),
            confirmed,
        )

    def _retry_checkpoint(self) -> None:
        """Another reader keeps deleted text in the write-ahead log: try until it is gone."""
        if self._checkpoint_timer is not None:
            return
        self.notify(
            "Another program has the chat database open, so the deleted text stays in its "
            "log file until it lets go; granite-chat keeps trying.",
            title="Deleting",
            timeout=8,
        )

        def again() -> None:
            if self.store.checkpoint():
                self._checkpoint_timer.stop()
                self._checkpoint_timer = None

        self._checkpoint_timer = self.set_interval(1.0, again)

    def action_copy_last_answer(self) -> None:
        answers = [v for v in self.conversation.query(MessageView) if v.role == "assistant"]
        if not answers:
            self.notify("There is no answer to copy yet.", timeout=3)
            return
        answers[-1].action_copy_message()

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one(ChatList)
        self.sidebar_choice = not sidebar.display
        self._fit_width(self.size.width)

    # --- session cache ------------------------------------------------------------------------

    def action_toggle_session_cache(self) -> None:
        cache = self.session_cache
        cache.enabled = not cache.enabled
        self.store.set_setting("session_cache", cache.enabled)
        self._reopen_in_engine(same_chat=True)
        state = "on" if cache.enabled else "off: no session file is read or written"
        self.notify(f"Session cache {state}.", timeout=4)

    def action_clear_session_cache(self) -> None:
        freed = self.session_cache.clear()
        self._reopen_in_engine(same_chat=True)
        self.notify(f"Session cache cleared ({human_size(freed)} freed).", timeout=4)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        for command in super().get_system_commands(screen):
            if command.title != "Keys":  # Textual's lists the editor's keys, not the app's
                yield command
        commands = [
            ("Keys", "The app's keys", self.action_keys),
            ("New chat", "Start an empty conversation (ctrl+n)", self.action_new_chat),
            ("Search chats", "Find a chat by its words (ctrl+f)", self.action_search),
            ("Rename chat", "Give this chat another title", self.action_rename),
            ("Switch model", "Load another model: folders used before, the HF cache", self.action_switch_model),
            ("Attach document", f"Add a file to this chat ({ATTACH_COMMAND} PATH)", self.action_attach),
            ("Detach document", "Remove a document from this chat", self.action_detach),
            ("System prompt", "Set this chat's system prompt", self.action_system_prompt),
            (
                "Sampling settings",
                "Temperature, top p/k, min p, repetition penalty, max tokens, seed (ctrl+s)",
                self.action_settings,
            ),
            ("Regenerate", "Answer the last message again (ctrl+r)", self.action_regenerate),
            ("Previous answer variant", "Show the earlier answer", self.action_previous_variant),
            ("Next answer variant", "Show the later answer", self.action_next_variant),
            ("Edit last message", "Change it and answer again (↑ in the empty box)", self.action_edit_last),
            ("Export to Markdown", "Write this chat to a .md file", self.action_export),
            ("Delete chat", "Erase this chat from the database", self.action_delete_chat),
            ("Copy last answer", "Copy the last answer to the clipboard", self.action_copy_last_answer),
            ("Toggle chat list", "Show or hide the sidebar (ctrl+b)", self.action_toggle_sidebar),
            (
                "Session cache: turn " + ("off" if self.session_cache.enabled else "on"),
                "Files that let a reopened chat skip re-reading its history",
                self.action_toggle_session_cache,
            ),
            ("Clear session cache", "Remove every session cache file", self.action_clear_session_cache),
        ]
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)

    # --- quitting -----------------------------------------------------------------------

    async def action_quit(self) -> None:
        self._stop_for_exit()
        self.exit()

    def _stop_for_exit(self) -> None:
        """Keep the partial answer (marked stopped) and the typed draft; stop the engine."""
        try:
            if self.turn is not None:
                self.store.update_message(
                    self.turn.message_id, content=self.turn.view.content, status="stopped"
                )
                self.turn = None
            # The widget object, not a query: by now it may be out of the DOM.
            draft = self._prompt_widget.text if self._prompt_widget is not None else ""
            self.store.set_setting("draft", draft or None)
        except sqlite3.Error:
            pass  # nothing more can be saved; the rows written so far stay
        if self.engine is not None:
            self.engine.submit(Shutdown())

    async def on_unmount(self) -> None:
        self._stop_for_exit()
        if self.engine is not None:
            # Shutdown cancels any answer; MLX checks the flag every token. The thread is
            # a daemon, so a stuck prefill cannot keep the process alive past this.
            self.engine.join(timeout=5)
        self.store.close()


def tune_gc_for_streaming() -> None:
    """Keep garbage collection from stalling key presses while an answer streams.

    Streaming allocates fast, and CPython's full collections walk every live object
    (the library, huggingface_hub, Textual, the widget tree): 100-400 ms each on a
    small machine. Freezing what exists at start-up (it lives as long as the process)
    and collecting less often keeps the worst key delay near the cost of one render.
    Process-wide, so the command line does it, not the app.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def build_parser() -> argparse.ArgumentParser:
    # Named as the user typed it: `granite-chat` or `granite-mlx chat`.
    prog = "granite-mlx chat" if Path(sys.argv[0]).name == "granite-mlx" else "granite-chat"
    d = SamplingSettings()
    parser = ArgumentParser(  # errors are one line (a GraniteError), as in granite-mlx
        prog=prog,
        description="Chat with an IBM Granite 4.0 model in the terminal. Sampling options "
        "apply to new chats in this run; saved chats keep their own settings.",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a local model folder or a Hugging Face repo id (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--system", default=None, help="system prompt for new chats (default: none)")
    parser.add_argument(
        "--temperature",
        "--temp",
        type=finite_float,
        default=None,
        help=f"sampling temperature, 0 = greedy (default: your saved default, {d.temperature} "
        f"until you change it)",
    )
    parser.add_argument(
        "--max-tokens",
        type=whole_number,
        default=None,
        help=f"answer length limit (default: your saved default, {d.max_tokens} until you "
        f"change it)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where chats and session caches are kept (default: the user data folder, or "
        "$GRANITE_MLX_DATA_DIR)",
    )
    parser.add_argument(
        "--export-dir", type=Path, default=None, help="where exports go (default: here)"
    )
    parser.add_argument(
        "--no-session-cache",
        action="store_true",
        help="neither read nor write session cache files in this run (default: on, unless "
        "turned off in the app)",
    )
    parser.add_argument(
        "--session-cache-mb",
        type=whole_number,
        default=None,
        help=f"cap on the session cache files' total size; the least recently used go first "
        f"(default: {DEFAULT_MAX_MB} MB)",
    )
    from granite_mlx.speculative import add_cli_options

    add_cli_options(parser)
    # A scripted model, for trying the interface and for tests; not for users.
    parser.add_argument("--fake-engine", action="store_true", help=argparse.SUPPRESS)
    return parser


def _check_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling overrides, or StoreError (a GraniteError) naming the bad option."""
    overrides = {
        name: value
        for name, value in (("temperature", args.temperature), ("max_tokens", args.max_tokens))
        if value is not None
    }
    if problem := replace(SamplingSettings(), **overrides).problem():
        flag = "--temperature" if problem.startswith("Temperature") else "--max-tokens"
        raise StoreError(f"{flag}: {problem}")
    if args.session_cache_mb is not None and args.session_cache_mb <= 0:
        raise StoreError("--session-cache-mb must be 1 or more (or use --no-session-cache).")
    if args.system is not None and not args.system.strip():
        raise StoreError("--system is empty: leave it out for no system prompt.")
    return overrides


def _drafting(args: argparse.Namespace) -> dict[str, Any]:
    """Speculative decoding options from the flags, checked now; the draft model itself
    loads on the engine thread at the first answer."""
    from granite_mlx.speculative import DraftError, check_num_draft_tokens, make_drafter

    if args.draft_model is not None and args.prompt_lookup:
        raise DraftError("Use --draft-model or --prompt-lookup, not both.")
    if args.prompt_lookup is not None:
        make_drafter(prompt_lookup=args.prompt_lookup)
        check_num_draft_tokens(args.prompt_lookup)
        return {"prompt_lookup": args.prompt_lookup} if args.prompt_lookup else {}
    if args.draft_model is None:
        return {}
    check_num_draft_tokens(args.num_draft_tokens)
    return {"draft_model": args.draft_model, "num_draft_tokens": args.num_draft_tokens}


def app_from_args(
    args: argparse.Namespace, engine_factory: EngineFactory | None = None
) -> GraniteChatApp:
    """The app the command line asks for; StoreError (one line for the user) if it cannot be."""
    if args.fake_engine and engine_factory is None:
        from .fake_engine import FakeEngine, FakeScript

        def engine_factory(emit):  # type: ignore[no-redef]
            return FakeEngine(emit, FakeScript(delay=0.03))

    sampling = _check_options(args)
    drafting = _drafting(args)
    data_dir = ensure_private_dir(args.data_dir or default_data_dir())
    return GraniteChatApp(
        args.model,
        engine_factory=engine_factory,
        data_dir=data_dir,
        export_dir=args.export_dir,
        system=args.system,
        sampling=sampling,
        session_cache=False if args.no_session_cache else None,
        session_cache_mb=args.session_cache_mb,
        drafting=drafting,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Every mistake in the options is one line and exit 1, before anything loads.
    try:
        app = app_from_args(parser.parse_args(argv))
    except GraniteError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    tune_gc_for_streaming()
    app.run()
    return 0


run = main  # what `granite-mlx chat` calls with the arguments after "chat"


if __name__ == "__main__":
    sys.exit(main())
