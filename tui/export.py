"""Export a chat to a Markdown file (written whole or not at all, readable by the user only)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

from .protocol import GenerationStats
from .store import Chat, Document, StoredMessage, ensure_private_dir, safe_text
from .widgets import ROLE_LABELS, format_stats, tool_calls_from_history


def chat_to_markdown(
    chat: Chat, messages: list[StoredMessage], documents: list[Document] | None = None
) -> str:
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(chat.created_at))
    lines = [f"# {chat.title}", ""]
    meta = f"_Chat from {created}"
    if chat.model:
        meta += f" with {chat.model}"
    lines += [meta + "_", ""]
    if chat.system:
        lines += ["## System", "", chat.system, ""]
    if documents:
        lines += ["## Documents", ""]
        lines += [f"- {d.title}" + (f" ({d.source})" if d.source else "") for d in documents]
        lines += [""]
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


def export_chat(
    chat: Chat,
    messages: list[StoredMessage],
    folder: Path,
    documents: list[Document] | None = None,
) -> Path:
    """Write the chat into ``folder`` and return the file's path.

    The text goes to a temporary file (0600, as mkstemp makes it) renamed over the
    export only once complete, so a failure leaves an earlier export as it was. Text
    that cannot be encoded (a lone surrogate) is written as U+FFFD.
    """
    if not folder.is_dir():
        ensure_private_dir(folder, "export folder")
    path = folder / export_file_name(chat)
    data = safe_text(chat_to_markdown(chat, messages, documents)).encode("utf-8")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path
