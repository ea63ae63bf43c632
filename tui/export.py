"""Export a chat to a Markdown file."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from .protocol import GenerationStats
from .store import Chat, StoredMessage
from .widgets import ROLE_LABELS, format_stats, tool_calls_from_history


def chat_to_markdown(chat: Chat, messages: list[StoredMessage]) -> str:
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(chat.created_at))
    lines = [f"# {chat.title}", ""]
    meta = f"_Chat from {created}"
    if chat.model:
        meta += f" with {chat.model}"
    lines += [meta + "_", ""]
    if chat.system:
        lines += ["## System", "", chat.system, ""]
    for message in messages:
        lines += [f"## {ROLE_LABELS.get(message.role, message.role)}", "", message.content, ""]
        for call in tool_calls_from_history(message.tool_calls):
            arguments = json.dumps(call.arguments, indent=2, ensure_ascii=False)
            lines += [f"Tool call `{call.name}`:", "", "```json", arguments, "```", ""]
        if message.role != "assistant":
            continue
        if message.status == "error":
            lines += [f"> error: {message.error or 'unknown'}", ""]
        elif footer := format_stats(GenerationStats.from_dict(message.stats), message.status):
            lines += [f"> {footer}", ""]
    return "\n".join(lines).rstrip() + "\n"


def export_file_name(chat: Chat) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", chat.title.lower()).strip("-")[:40] or "chat"
    return f"{slug}-{chat.id}.md"


def export_chat(chat: Chat, messages: list[StoredMessage], folder: Path) -> Path:
    """Write the chat into ``folder`` and return the file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / export_file_name(chat)
    path.write_text(chat_to_markdown(chat, messages), encoding="utf-8")
    return path
