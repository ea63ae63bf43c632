"""The chat's widgets: the prompt, one message, its tool calls and stats, the chat list."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Collapsible, Label, ListItem, ListView, Markdown, Static, TextArea
from textual.widgets._markdown import MarkdownBlock, MarkdownFence, MarkdownStream

from .protocol import GenerationStats, ToolCallInfo

ROLE_LABELS = {"user": "You", "assistant": "Granite", "system": "System"}


def format_stats(stats: GenerationStats | None, status: str = "done") -> str:
    """The answer footer, e.g. '42 tokens · 55.1 tok/s · prompt 310.0 tok/s · peak 0.61 GB'."""
    parts: list[str] = []
    if status == "stopped":
        parts.append("stopped")
    elif status == "length":
        parts.append("max tokens reached")
    if stats is not None:
        parts += [
            f"{stats.generation_tokens} tokens",
            f"{stats.generation_tps:.1f} tok/s",
            f"prompt {stats.prompt_tps:.1f} tok/s",
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
    """The message box: Enter sends, Shift+Enter or Ctrl+J adds a newline."""

    class Submitted(Message):
        def __init__(self, prompt: PromptInput, text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

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
    """One message: who, the Markdown body, tool calls, and for answers a stats footer.

    While an answer streams, text goes through a MarkdownStream (which batches appends
    when the widget falls behind); at the end one full update() renders it cleanly.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "copy_message", "Copy message"),
        Binding("k", "copy_code", "Copy code"),
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
    ) -> None:
        super().__init__(classes=f"message -{role}")
        self.role = role
        self.content = content
        self.status = status
        self.stats = stats
        self.error = error
        self.tool_calls = list(tool_calls or [])
        self.message_id = message_id
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Label(ROLE_LABELS.get(self.role, self.role), classes="role")
        yield ChatMarkdown(self.content, classes="body")
        yield Vertical(*(ToolCallBlock(c) for c in self.tool_calls), classes="tool-calls")
        yield Static(self._footer_text(), classes="footer", markup=False)

    def on_mount(self) -> None:
        self._apply_status_classes()

    @property
    def body(self) -> ChatMarkdown:
        return self.query_one(".body", ChatMarkdown)

    def _footer_text(self) -> str:
        if self.role != "assistant":
            return ""
        if self.status == "error":
            return f"error: {self.error or 'unknown'}"
        if self.status == "streaming":
            return "…"
        return format_stats(self.stats, self.status)

    def _apply_status_classes(self) -> None:
        for status in ("streaming", "stopped", "error", "length"):
            self.set_class(self.status == status, f"-{status}")
        footer = self.query_one(".footer", Static)
        footer.update(self._footer_text())
        footer.display = bool(self._footer_text())

    async def append(self, text: str) -> None:
        if not text:
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(self.body)
        self.content += text
        await self._stream.write(text)

    async def add_tool_calls(self, calls: tuple[ToolCallInfo, ...] | list[ToolCallInfo]) -> None:
        self.tool_calls += list(calls)
        await self.query_one(".tool-calls", Vertical).mount_all(ToolCallBlock(c) for c in calls)

    async def finish(
        self, status: str, stats: GenerationStats | None = None, error: str | None = None
    ) -> None:
        """End streaming: one full render of the text, then the footer."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        await self.body.update(self.content)
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


class ChatList(ListView):
    """The sidebar: past chats, newest first. Each item's id is chat-<id>."""

    class Opened(Message):
        def __init__(self, chat_id: int) -> None:
            super().__init__()
            self.chat_id = chat_id

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        if event.item.id and event.item.id.startswith("chat-"):
            self.post_message(self.Opened(int(event.item.id.removeprefix("chat-"))))

    async def show(self, chats: list[tuple[int, str]], current: int | None) -> None:
        await self.clear()
        items = [ListItem(Label(title, markup=False), id=f"chat-{cid}") for cid, title in chats]
        await self.extend(items)
        for index, (cid, _) in enumerate(chats):
            if cid == current:
                self.index = index
                break
        else:
            self.index = None
