"""The terminal chat app: ``granite-chat`` / ``granite-mlx chat``.

The app owns the screen and the database; the engine thread owns the model. They talk
only through the dataclasses in ``protocol.py``: requests go in with ``engine.submit``,
events come back as ``EngineMessage`` posted onto the app's queue, so the UI never
waits on MLX. The database is the source of truth for a chat: whenever the engine's
state is in doubt (a failed answer, a retried turn) the app reopens the chat from it.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, ProgressBar, Static

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
    Regenerate,
    Request,
    SamplingSettings,
    Send,
    SetSystem,
    Shutdown,
    Token,
)
from .screens import ConfirmScreen, SettingsScreen, TextEditScreen
from .store import (
    DB_NAME,
    Chat,
    ChatStore,
    StoredMessage,
    StoreError,
    default_data_dir,
    history_for_session,
)
from .widgets import ChatList, MessageView, PromptInput, tool_calls_from_history

# How often a streaming answer is written to the database, so that a crash or a quit
# loses at most this much of it.
SAVE_PARTIAL_SECONDS = 0.5

FINISH_STATUS = {"stop": "done", "length": "length", "cancelled": "stopped"}


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


def chat_title(text: str, limit: int = 40) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "New chat")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def message_view(message: StoredMessage) -> MessageView:
    return MessageView(
        message.role,
        message.content,
        status=message.status,
        stats=GenerationStats.from_dict(message.stats),
        error=message.error,
        tool_calls=tool_calls_from_history(message.tool_calls),
        message_id=message.id,
    )


class GraniteChatApp(App[None]):
    CSS_PATH = "chat.tcss"
    TITLE = "granite-mlx chat"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+up", "edit_last", "Edit last"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+b", "toggle_sidebar", "Chats"),
    ]

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        engine_factory: EngineFactory | None = None,
        data_dir: Path | None = None,
        export_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.model_name = model
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.sessions_dir = self.data_dir / "sessions"
        self.export_dir = Path(export_dir) if export_dir else Path.cwd()
        self.store = ChatStore(self.data_dir / DB_NAME)
        self.engine_factory: EngineFactory = engine_factory or RealEngine
        self.engine: Engine | None = None
        self.chat: Chat | None = None  # None: a new chat, not saved until its first message
        self.draft_system: str | None = None
        self.settings = SamplingSettings()
        self.turn: StreamingTurn | None = None
        self.model_state = "loading"  # loading | ready | failed
        self.model_error: str | None = None
        self._request_ids = itertools.count(1)
        self.last_export: Path | None = None

    # --- layout -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            yield ChatList(id="sidebar")
            with Vertical(id="main"):
                with Vertical(id="banner"):
                    yield Static(id="banner-text", markup=False)
                    yield ProgressBar(id="banner-progress", show_eta=False)
                yield VerticalScroll(id="conversation")
                yield PromptInput(
                    id="prompt",
                    placeholder="Message (Enter sends, Shift+Enter or Ctrl+J: new line)",
                )
        yield Footer()

    @property
    def conversation(self) -> VerticalScroll:
        return self.query_one("#conversation", VerticalScroll)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    async def on_mount(self) -> None:
        self.sub_title = f"{self.model_name} · loading"
        self.conversation.anchor()  # follow the answer until the user scrolls up
        self.store.mark_interrupted()
        await self.refresh_chat_list()
        if self.store.notice:
            self.notify(self.store.notice, title="Chat history", severity="warning", timeout=20)
        self._show_banner(f"Loading {self.model_name}…")
        self.query_one("#banner-progress").display = False
        self.prompt.focus()
        self.engine = self.engine_factory(self._post_engine_event)
        self.engine.start()
        self.engine.submit(Load(self.model_name))

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

    def _session_path(self, chat_id: int) -> str:
        return str(self.sessions_dir / f"chat-{chat_id}.safetensors")

    # --- engine events ------------------------------------------------------------------

    def _post_engine_event(self, event: Event) -> None:
        """Called on the engine thread; post_message is thread-safe."""
        self.post_message(EngineMessage(event))

    async def on_engine_message(self, message: EngineMessage) -> None:
        event = message.event
        if isinstance(event, Token):
            await self._on_token(event)
        elif isinstance(event, Done):
            await self._on_done(event)
        elif isinstance(event, Error):
            await self._on_error(event)
        elif isinstance(event, LoadProgress):
            self._on_load_progress(event)
        elif isinstance(event, Loaded):
            self.model_state = "ready"
            self.sub_title = self.model_name
            self.query_one("#banner").display = False
        elif isinstance(event, LoadFailed):
            self.model_state = "failed"
            self.model_error = event.message
            self.sub_title = f"{self.model_name} · not loaded"
            self._show_banner(
                f"The model could not be loaded.\n{event.message}\n"
                f"Past chats can still be read, exported and deleted.",
                error=True,
            )
            self.query_one("#banner-progress").display = False

    def _on_load_progress(self, event: LoadProgress) -> None:
        bar = self.query_one("#banner-progress", ProgressBar)
        bar.display = True
        bar.update(total=event.total, progress=event.completed)
        done_mb = event.completed / 1e6
        total = f" of {event.total / 1e6:.0f} MB" if event.total else " MB"
        self._show_banner(f"Downloading {self.model_name}: {done_mb:.0f}{total}")

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
        if event.tool_calls:
            await turn.view.add_tool_calls(event.tool_calls)
        now = time.monotonic()
        if now - turn.saved_at >= SAVE_PARTIAL_SECONDS:
            self.store.update_message(turn.message_id, content=turn.view.content)
            turn.saved_at = now

    async def _on_done(self, event: Done) -> None:
        turn = self._current_turn(event.request_id)
        if turn is None:
            return
        status = FINISH_STATUS[event.finish_reason]
        tool_calls = event.history_tool_calls
        if tool_calls is None and turn.view.tool_calls:
            tool_calls = [{"name": c.name, "arguments": c.arguments} for c in turn.view.tool_calls]
        self.store.update_message(
            turn.message_id,
            content=turn.view.content,
            status=status,
            stats=asdict(event.stats) if event.stats else None,
            tool_calls=tool_calls,
        )
        try:
            await turn.view.finish(status, event.stats)
            await self.refresh_chat_list()  # its order follows the latest answer
        finally:
            self._turn_ended()

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

    def _reopen_in_engine(self) -> None:
        if self.chat is None:
            self._submit(OpenChat((), self.draft_system, None))
            return
        messages = self.store.messages(self.chat.id)
        self._submit(
            OpenChat(
                tuple(history_for_session(messages)),
                self.chat.system,
                self._session_path(self.chat.id),
            )
        )

    # --- sending ------------------------------------------------------------------------

    def _refuse_if_busy(self, needs_model: bool = True) -> bool:
        """Notify and return True when a new answer cannot start now."""
        if self.turn is not None:
            self.notify("Still answering: press Esc to stop it first.", timeout=3)
            return True
        if needs_model and self.model_state == "failed":
            self.notify(f"No model is loaded: {self.model_error}", severity="error", timeout=8)
            return True
        return False

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        if not event.text.strip() or self._refuse_if_busy():
            return
        self.prompt.clear()
        await self._send(event.text)

    async def _send(self, text: str) -> None:
        chat = await self._ensure_chat(text)
        row = self.store.add_message(chat.id, "user", text)
        await self._mount(MessageView("user", text, message_id=row.id))
        await self._start_turn(Send(next(self._request_ids), text, self.settings))

    async def _ensure_chat(self, first_text: str) -> Chat:
        """Save a new chat on its first message, and point the engine at its session file."""
        if self.chat is not None:
            return self.chat
        self.chat = self.store.create_chat(
            chat_title(first_text),
            system=self.draft_system,
            model=self.model_name,
            settings=asdict(self.settings),
        )
        self._submit(OpenChat((), self.chat.system, self._session_path(self.chat.id)))
        await self.refresh_chat_list()
        return self.chat

    async def _mount(self, view: MessageView) -> None:
        await self.conversation.mount(view)

    async def _start_turn(self, request: Send | Regenerate | EditLast) -> None:
        assert self.chat is not None
        row = self.store.add_message(self.chat.id, "assistant", "", status="streaming")
        view = MessageView("assistant", status="streaming", message_id=row.id)
        self.turn = StreamingTurn(request.request_id, row.id, view, time.monotonic())
        await self._mount(view)
        self.conversation.anchor()  # a new answer: follow it again
        self.sub_title = f"{self.model_name} · answering (Esc stops)"
        self.refresh_bindings()
        self._submit(request)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.turn is not None
        return True

    # --- actions ------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.turn is not None:
            self._submit(Cancel())
            self.sub_title = f"{self.model_name} · stopping"

    async def action_new_chat(self) -> None:
        if self._refuse_if_busy(needs_model=False):
            return
        self.chat = None
        self.draft_system = None
        await self.conversation.remove_children()
        self._submit(OpenChat())
        await self.refresh_chat_list()
        self.prompt.focus()

    async def on_chat_list_opened(self, event: ChatList.Opened) -> None:
        if self.chat is not None and self.chat.id == event.chat_id:
            return
        await self.open_chat(event.chat_id)

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
        await self.conversation.remove_children()
        await self.conversation.mount_all(message_view(m) for m in self.store.messages(chat.id))
        self.conversation.anchor()
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

    async def _retry(self, user: StoredMessage, text: str) -> None:
        """Ask again for a turn the model never saw whole (its answer failed)."""
        await self._drop_from(user.id)
        self._reopen_in_engine()
        await self._send(text)

    async def action_regenerate(self) -> None:
        if self._refuse_if_busy():
            return
        user, answer = self._last_turn()
        if user is None:
            self.notify("There is no answer to regenerate yet.", timeout=3)
            return
        if answer is None or answer.status == "error":
            await self._retry(user, user.content)
            return
        await self._drop_from(answer.id)
        await self._start_turn(Regenerate(next(self._request_ids), self.settings))

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
            if answer is None or answer.status == "error":
                await self._retry(user, text)
                return
            assert self.chat is not None
            await self._drop_from(answer.id)
            self.store.update_message(user.id, content=text)
            for view in self._views_from(user.id):
                view.content = text
                await view.body.update(text)
            await self._start_turn(EditLast(next(self._request_ids), text, self.settings))

        self.push_screen(
            TextEditScreen("Edit your last message", user.content, "The answer is regenerated."),
            edited,
        )

    def action_system_prompt(self) -> None:
        current = self.chat.system if self.chat else self.draft_system

        def saved(text: str | None) -> None:
            if text is None:
                return
            system = text.strip() or None
            if self.chat is not None:
                self.store.update_chat(self.chat.id, system=system)
                self.chat = self.store.get_chat(self.chat.id)
            else:
                self.draft_system = system
            self._submit(SetSystem(system))
            self.notify("System prompt set" if system else "System prompt cleared", timeout=3)

        self.push_screen(
            TextEditScreen("System prompt", current or "", "Empty: no system prompt."), saved
        )

    def action_settings(self) -> None:
        def saved(settings: SamplingSettings | None) -> None:
            if settings is None:
                return
            self.settings = settings
            if self.chat is not None:
                self.store.update_chat(self.chat.id, settings=asdict(settings))
            self.notify("Sampling settings saved", timeout=3)

        self.push_screen(SettingsScreen(self.settings), saved)

    def _save_partial_answer(self) -> None:
        if self.turn is not None:
            self.store.update_message(self.turn.message_id, content=self.turn.view.content)

    def action_export(self) -> None:
        if self.chat is None:
            self.notify("Nothing to export yet.", timeout=3)
            return
        self._save_partial_answer()
        try:
            path = export_chat(self.chat, self.store.messages(self.chat.id), self.export_dir)
        except OSError as exc:
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
            self.store.delete_chat(chat.id)
            for path in self.sessions_dir.glob(f"chat-{chat.id}.*"):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            if self.chat is not None and self.chat.id == chat.id:
                await self.action_new_chat()
            await self.refresh_chat_list()
            self.notify(f"Deleted “{chat.title}”", timeout=3)

        self.push_screen(
            ConfirmScreen(f"Delete the chat “{chat.title}”? Its messages are erased."),
            confirmed,
        )

    def action_copy_last_answer(self) -> None:
        answers = [v for v in self.conversation.query(MessageView) if v.role == "assistant"]
        if not answers:
            self.notify("There is no answer to copy yet.", timeout=3)
            return
        answers[-1].action_copy_message()

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one(ChatList)
        sidebar.display = not sidebar.display

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand(
            "New chat", "Start an empty conversation (ctrl+n)", self.action_new_chat
        )
        yield SystemCommand(
            "System prompt", "Set this chat's system prompt", self.action_system_prompt
        )
        yield SystemCommand(
            "Sampling settings",
            "Temperature, top p, top k, max tokens, seed (ctrl+s)",
            self.action_settings,
        )
        yield SystemCommand(
            "Regenerate", "Answer the last message again (ctrl+r)", self.action_regenerate
        )
        yield SystemCommand(
            "Edit last message", "Change it and answer again (ctrl+up)", self.action_edit_last
        )
        yield SystemCommand(
            "Export to Markdown", "Write this chat to a .md file", self.action_export
        )
        yield SystemCommand(
            "Delete chat", "Erase this chat from the database", self.action_delete_chat
        )
        yield SystemCommand(
            "Copy last answer",
            "Copy the last answer to the clipboard",
            self.action_copy_last_answer,
        )
        yield SystemCommand(
            "Toggle chat list", "Show or hide the sidebar (ctrl+b)", self.action_toggle_sidebar
        )

    # --- quitting -----------------------------------------------------------------------

    async def action_quit(self) -> None:
        self._stop_for_exit()
        self.exit()

    def _stop_for_exit(self) -> None:
        """Keep the partial answer (marked stopped) and stop the engine."""
        if self.turn is not None:
            self.store.update_message(
                self.turn.message_id, content=self.turn.view.content, status="stopped"
            )
            self.turn = None
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
    parser = argparse.ArgumentParser(
        prog=prog, description="Chat with an IBM Granite 4.0 model in the terminal."
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a local model folder or a Hugging Face repo id (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where chats are kept (default: the user data folder, or $GRANITE_MLX_DATA_DIR)",
    )
    parser.add_argument(
        "--export-dir", type=Path, default=None, help="where exports go (default: here)"
    )
    # A scripted model, for trying the interface and for tests; not for users.
    parser.add_argument("--fake-engine", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    engine_factory: EngineFactory | None = None
    if args.fake_engine:
        from .fake_engine import FakeEngine, FakeScript

        def engine_factory(emit):  # type: ignore[no-redef]
            return FakeEngine(emit, FakeScript(delay=0.03))

    try:
        app = GraniteChatApp(
            args.model,
            engine_factory=engine_factory,
            data_dir=args.data_dir,
            export_dir=args.export_dir,
        )
    except StoreError as exc:
        print(f"granite-chat: {exc}", file=sys.stderr)
        return 1
    tune_gc_for_streaming()
    app.run()
    return 0


run = main  # what `granite-mlx chat` calls with the arguments after "chat"


if __name__ == "__main__":
    sys.exit(main())
