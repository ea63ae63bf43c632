"""Session cache files: a chat's model cache on disk, so reopening it skips the prefill.

``sessions/chat-<id>.safetensors`` holds what ChatSession.save writes (the conversation
and its cache, 60-90 MB per chat on the H-350M shape). They are only a speed-up: a
chat without one is rebuilt from its messages. So they are

* capped by total size: after each save, the least recently used files go first;
* kept per model: a file saved with another model is deleted, never reused;
* removed with their chat, and all at once from the palette;
* optional: turned off, no file is read or written.

Which model wrote a file, its size and when it was last used live in the database
(``session_files``); the folder listing is the truth for what exists.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from .store import ChatStore, ensure_private_dir

DEFAULT_MAX_MB = 2048


def file_name(chat_id: int) -> str:
    return f"chat-{chat_id}.safetensors"


@dataclass
class SessionCache:
    folder: Path
    store: ChatStore
    enabled: bool = True
    max_bytes: int = DEFAULT_MAX_MB * 1_000_000

    def path(self, chat_id: int) -> Path:
        return self.folder / file_name(chat_id)

    def path_for(self, chat_id: int, model: str) -> str | None:
        """Where the engine may read and write this chat's cache with ``model``, or None.

        A file written with another model (or whose model is not recorded) is deleted:
        its cache would not fit this model's weights.
        """
        if not self.enabled:
            return None
        path = self.path(chat_id)
        if path.exists():
            recorded = self.store.session_file(chat_id)
            if recorded is None or recorded[0] != model:
                self.remove(chat_id)
            else:
                self.store.touch_session_file(chat_id)
        ensure_private_dir(self.folder, "session cache folder")
        return str(path)

    def saved(self, chat_id: int, model: str) -> list[int]:
        """Record the file the engine just wrote, then keep under the cap.

        Returns the chats whose files were removed (least recently used first).
        """
        path = self.path(chat_id)
        if not self.enabled or not path.exists():
            return []
        self.store.record_session_file(chat_id, model, path.stat().st_size)
        return self.enforce_cap()

    def files(self) -> dict[int, Path]:
        found = {}
        if self.folder.is_dir():
            for path in self.folder.glob("chat-*.safetensors"):
                with contextlib.suppress(ValueError):
                    found[int(path.name.removeprefix("chat-").removesuffix(".safetensors"))] = path
        return found

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files().values() if p.exists())

    def enforce_cap(self) -> list[int]:
        files = self.files()
        recorded = self.store.session_files()
        known_chats = {chat.id for chat in self.store.list_chats()}
        removed = []
        # Files of deleted chats first, then by last use (a file not recorded counts as
        # used when it was written).
        def last_use(item: tuple[int, Path]) -> tuple[int, float]:
            chat_id, path = item
            used = recorded[chat_id][2] if chat_id in recorded else path.stat().st_mtime
            return (chat_id in known_chats, used)

        entries = sorted(files.items(), key=last_use)
        total = sum(path.stat().st_size for _, path in entries)
        for chat_id, path in entries:
            if total <= self.max_bytes and chat_id in known_chats:
                break
            total -= path.stat().st_size
            self.remove(chat_id)
            removed.append(chat_id)
        return removed

    def remove(self, chat_id: int) -> None:
        for path in self.folder.glob(f"chat-{chat_id}.*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.store.forget_session_file(chat_id)

    def clear(self) -> int:
        """Remove every session file; return the bytes freed."""
        freed = 0
        for chat_id, path in self.files().items():
            with contextlib.suppress(FileNotFoundError):
                freed += path.stat().st_size
            self.remove(chat_id)
        return freed
