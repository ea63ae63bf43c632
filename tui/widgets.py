"""The chat's widgets: the prompt, one message, its tool calls and stats, the chat list."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Collapsible, Label, ListItem, ListView, Markdown, Static, TextArea
from textual.widgets._markdown import MarkdownBlock, MarkdownFence, MarkdownStream

from .protocol import GenerationStats, ToolCallInfo

ROLE_LABELS = {"user": "You", "assistant": "Granite", "system": "System"}


def format_stats(stats: GenerationStats | None, status: str = "done") -> str:
    """The answer footer, e.g. 'first token 0.21 s · prompt 310 tokens (280 cached) ·
    42 tokens · 55.1 tok/s · peak 0.61 GB'. Fields an older answer lacks are left out."""
    parts: list[str] = []
    if status == "stopped":
        parts.append("stopped")
    elif status == "length":
        parts.append("max tokens reached")
    if stats is not None:
        if stats.ttft is not None:
            parts.append(f"first token {stats.ttft:.2f} s")
        if stats.cached_tokens is not None:
            total = stats.prompt_tokens + stats.cached_tokens
            parts.append(f"prompt {total:,} tokens ({stats.cached_tokens:,} cached)")
        else:
            parts.append(f"prompt {stats.prompt_tokens:,} tokens")
        parts += [
            f"{stats.generation_tokens:,} tokens",
            f"{stats.generation_tps:.1f} tok/s",
            f"peak {stats.peak_memory:.2f} GB",
        ]
    return " · ".join(parts)


def tool_calls_from_history(entries: list[Any] | None) -> list[ToolCallInfo]:
    """Read a stored "tool_calls" entry, whether flat or in the OpenAI "function" shape."""
    calls = []
    for entry in entries or []:
        if not isinstance(entry, dict):
            continue
        spec = entry.get("function", entry)
        arguments = spec.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {"raw": arguments}
        calls.append(ToolCallInfo(name=str(spec.get("name", "?")), arguments=arguments))
    return calls


class PromptInput(TextArea):
    """The message box: Enter sends, Ctrl+J (or Shift+Enter) adds a newline, and Up in
    an empty box asks to edit the last message (as in Slack)."""

    class Submitted(Message):
        def __init__(self, prompt: PromptInput, text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

    class EditLastRequested(Message):
        pass

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        if event.key == "up" and not self.text:
            event.stop()
            event.prevent_default()
            self.post_message(self.EditLastRequested())
            return
        await super()._on_key(event)


class CopyableFence(MarkdownFence):
    """A code block that copies its code when clicked."""

    def on_click(self, event: events.Click) -> None:
        event.stop()
        self.app.copy_to_clipboard(self.code)
        self.app.notify("Code block copied", timeout=2)


class ChatMarkdown(Markdown):
    BLOCKS: ClassVar[dict[str, type[MarkdownBlock]]] = {
        **Markdown.BLOCKS,
        "fence": CopyableFence,
        "code_block": CopyableFence,
    }


class ToolCallBlock(Collapsible):
    """One tool call, collapsed to its name; expands to the JSON arguments."""

    def __init__(self, call: ToolCallInfo) -> None:
        title = f"tool call: {call.name}"
        if not call.valid:
            title += f" (invalid: {call.error or 'unparsable'})"
        body = json.dumps(call.arguments, indent=2, ensure_ascii=False)
        if not call.valid and call.raw:
            body = call.raw
        super().__init__(
            Static(body, classes="tool-args", markup=False), title=title, collapsed=True
        )
        self.call = call
        if not call.valid:
            self.add_class("-invalid")


class MessageView(Vertical, can_focus=True):
    """One message: who, the body, tool calls, and for answers a stats footer.

    An answer's body is Markdown: while it streams, text goes through a MarkdownStream
    (which batches appends when the widget falls behind); at the end one full update()
    renders it cleanly. A user's message is shown as typed, line breaks included (a
    Markdown renderer would join single newlines).

    Messages are not Tab stops (the conversation is one, see ``Conversation``): a
    message gets focus by a click or from the conversation, and then Up/Down move
    between messages, Enter copies, Ctrl+K copies the code, Left/Right show the other
    variants of the last answer. Letters go to the message box (the app sends them).
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "copy_message", "Copy"),
        Binding("ctrl+k", "copy_code", "Copy code"),
        Binding("up", "move(-1)", "Previous", show=False),
        Binding("down", "move(1)", "Next", show=False),
        Binding("left", "app.previous_variant", "Earlier variant", show=False),
        Binding("right", "app.next_variant", "Later variant", show=False),
    ]

    def __init__(
        self,
        role: str,
        content: str = "",
        *,
        status: str = "done",
        stats: GenerationStats | None = None,
        error: str | None = None,
        tool_calls: list[ToolCallInfo] | None = None,
        message_id: int | None = None,
        variant: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(classes=f"message -{role}")
        self.role = role
        self.content = content
        self.status = status
        self.stats = stats
        self.error = error
        self.tool_calls = list(tool_calls or [])
        self.message_id = message_id
        self.variant = variant  # (shown, count) when the answer has several variants
        self._stream: MarkdownStream | None = None
        self._live = ""  # the footer while streaming: prompt progress, then tokens/s

    def compose(self) -> ComposeResult:
        # Parts kept by reference: a query walks every Markdown block of a long answer,
        # too slow to do for each batch of tokens.
        self._variants = Static(self._variant_text(), classes="variants")
        if self.role == "assistant":
            self._body: Widget = ChatMarkdown(self.content, classes="body")
        else:
            self._body = Static(self.content, classes="body user-text", markup=False)
        self._tool_calls = Vertical(
            *(ToolCallBlock(c) for c in self.tool_calls), classes="tool-calls"
        )
        self._footer = Static(self._footer_text(), classes="footer", markup=False)
        with Horizontal(classes="role-line"):
            yield Label(ROLE_LABELS.get(self.role, self.role), classes="role")
            yield self._variants
        yield self._body
        yield self._tool_calls
        yield self._footer

    def on_mount(self) -> None:
        self._apply_status_classes()

    @property
    def body(self) -> Widget:
        return self._body

    def _variant_text(self) -> str:
        if not self.variant:
            return ""
        shown, count = self.variant
        return f"[@click=app.previous_variant]‹[/] {shown}/{count} [@click=app.next_variant]›[/]"

    def set_variant(self, variant: tuple[int, int] | None) -> None:
        self.variant = variant
        self._variants.update(self._variant_text())

    def _footer_text(self) -> str:
        if self.role != "assistant":
            return ""
        if self.status == "error":
            return f"error: {self.error or 'unknown'}"
        if self.status == "streaming":
            return self._live or "…"
        return format_stats(self.stats, self.status)

    def _apply_status_classes(self) -> None:
        for status in ("streaming", "stopped", "error", "length"):
            self.set_class(self.status == status, f"-{status}")
        self._footer.update(self._footer_text())
        self._footer.display = bool(self._footer_text())

    def _set_live(self, text: str) -> None:
        if text != self._live:
            self._live = text
            # One line while streaming (see chat.tcss): no layout pass per update, which
            # would cost the whole conversation's layout 30 times a second.
            if self._footer.is_attached:  # not while the app is torn down
                self._footer.update(text, layout=False)

    def show_prompt_progress(self, processed: int, total: int) -> None:
        if self.status == "streaming":
            self._set_live(f"reading prompt {processed:,}/{total:,}")

    def show_live_rate(self, tokens: int, tps: float) -> None:
        if self.status == "streaming" and tokens:
            self._set_live(f"{tokens:,} tokens · {tps:.1f} tok/s")

    async def set_text(self, text: str) -> None:
        """Replace a finished message's text (an edited question)."""
        self.content = text
        body = self.body
        if isinstance(body, Markdown):
            await body.update(text)
        else:
            assert isinstance(body, Static)
            body.update(text)

    async def append(self, text: str) -> None:
        if not text:
            return
        if self._stream is None:
            assert isinstance(self._body, ChatMarkdown)
            self._stream = Markdown.get_stream(self._body)
        self.content += text
        await self._stream.write(text)

    async def add_tool_calls(self, calls: tuple[ToolCallInfo, ...] | list[ToolCallInfo]) -> None:
        self.tool_calls += list(calls)
        await self._tool_calls.mount_all(ToolCallBlock(c) for c in calls)

    async def finish(
        self, status: str, stats: GenerationStats | None = None, error: str | None = None
    ) -> None:
        """End streaming: one full render of the text, then the footer."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        await self.set_text(self.content)
        self.status, self.stats, self.error = status, stats, error
        self._apply_status_classes()

    def set_status(self, status: str) -> None:
        self.status = status
        self._apply_status_classes()

    def code_blocks(self) -> list[str]:
        return [fence.code for fence in self.body.query(MarkdownFence)]

    def action_copy_message(self) -> None:
        self.app.copy_to_clipboard(self.content)
        self.app.notify("Message copied", timeout=2)

    def action_copy_code(self) -> None:
        blocks = self.code_blocks()
        if not blocks:
            self.app.notify("This message has no code block", timeout=2)
            return
        self.app.copy_to_clipboard("\n\n".join(blocks))
        self.app.notify("Code copied", timeout=2)

    def action_move(self, step: int) -> None:
        """Focus the previous or next message; past the last one, the message box."""
        assert self.parent is not None
        views = list(self.parent.query_children(MessageView))
        index = views.index(self) + step
        if index >= len(views):
            self.app.action_focus_prompt()  # type: ignore[attr-defined]
        elif index >= 0:
            views[index].focus()


class Conversation(VerticalScroll):
    """The messages: one Tab stop that hands its focus to a message.

    Its children are left out of the Tab order (a long chat would otherwise take a Tab
    per message to cross); focusing the conversation focuses the last message on
    screen, from which Up/Down move on.
    """

    def allow_focus_children(self) -> bool:
        return False

    def _on_focus(self, event: events.Focus) -> None:
        views = list(self.query_children(MessageView))
        if not views:
            return
        visible = self.scrollable_content_region
        on_screen = [v for v in views if v.region.overlaps(visible)]
        (on_screen or views)[-1].focus(scroll_visible=not on_screen)

    def focus_neighbour(self, direction: int) -> None:
        """Tab / Shift+Tab from a message: the widget after / before the conversation."""
        chain = self.screen.focus_chain
        if self in chain:
            self.screen.set_focus(chain[(chain.index(self) + direction) % len(chain)])


class SystemPromptView(Static):
    """The chat's system prompt, at the top of the conversation."""

    def __init__(self, text: str) -> None:
        super().__init__(self.label(text), classes="system-prompt", markup=False)

    @staticmethod
    def label(text: str) -> str:
        return f"System prompt: {text}"

    def set_text(self, text: str) -> None:
        self.update(self.label(text))


class ChatList(ListView):
    """The sidebar: past chats, newest first. Each item's id is chat-<id>; the open
    chat's item has the class -open.

    Choosing a chat calls ``choose(chat_id)`` and waits for it: with Enter, that runs
    while the app handles the key, so keys typed right behind it already find the chat
    open and the focus in the message box.
    """

    def __init__(self, choose: Callable[[int], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.choose = choose

    def _chat_id(self, item: ListItem | None) -> int | None:
        if item is not None and item.id and item.id.startswith("chat-"):
            return int(item.id.removeprefix("chat-"))
        return None

    async def action_select_cursor(self) -> None:  # Enter
        if (chat_id := self._chat_id(self.highlighted_child)) is not None:
            await self.choose(chat_id)

    async def on_list_view_selected(self, event: ListView.Selected) -> None:  # a click
        event.stop()
        if (chat_id := self._chat_id(event.item)) is not None:
            await self.choose(chat_id)

    async def show(self, chats: list[tuple[int, str]], current: int | None) -> None:
        """List ``chats`` (id, title), marking ``current``. The same list as shown is
        not rebuilt, so a cursor the user is moving is left where it is."""
        if chats == getattr(self, "_shown", None):
            for item in self.children:
                item.set_class(item.id == f"chat-{current}", "-open")
            if current != getattr(self, "_current", None):
                self._highlight(chats, current)
            self._current = current
            return
        await self.clear()
        items = [
            ListItem(
                Label(title, markup=False),
                id=f"chat-{cid}",
                classes="-open" if cid == current else "",
            )
            for cid, title in chats
        ]
        await self.extend(items)
        self._shown, self._current = list(chats), current
        self._highlight(chats, current)

    def _highlight(self, chats: list[tuple[int, str]], current: int | None) -> None:
        ids = [cid for cid, _ in chats]
        self.index = ids.index(current) if current in ids else None
