"""Chats and their messages in SQLite (stdlib sqlite3).

The schema is versioned: each entry of MIGRATIONS runs once, recorded in
``schema_migrations``. Foreign keys are on, so deleting a chat deletes its messages,
and a delete leaves no text in the files (see ``delete_chat``).
A database that cannot be read is moved aside (renamed with a timestamp) and a new
one is made, with a notice for the user.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "GRANITE_MLX_DATA_DIR"
DB_NAME = "chats.sqlite3"

MIGRATIONS: list[str] = [
    # 1: chats and messages
    """
    CREATE TABLE chats (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL DEFAULT 'New chat',
        system TEXT,
        model TEXT,
        settings TEXT,             -- SamplingSettings as JSON
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        role TEXT NOT NULL,         -- user | assistant
        content TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'done',  -- done | streaming | stopped | length | error
        error TEXT,
        stats TEXT,                 -- GenerationStats as JSON
        tool_calls TEXT,            -- the session's tool_calls entry as JSON
        created_at REAL NOT NULL
    );
    CREATE INDEX messages_by_chat ON messages(chat_id, id);
    """,
]


def default_data_dir() -> Path:
    """The user's data folder: $GRANITE_MLX_DATA_DIR, else platformdirs, else XDG."""
    if override := os.environ.get(DATA_DIR_ENV):
        return Path(override).expanduser()
    try:
        from platformdirs import user_data_dir

        return Path(user_data_dir("granite-mlx", appauthor=False))
    except ImportError:
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(base) / "granite-mlx"


class StoreError(Exception):
    """The database can be used by neither this version nor moved aside."""


@dataclass(frozen=True)
class Chat:
    id: int
    title: str
    system: str | None
    model: str | None
    settings: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class StoredMessage:
    id: int
    chat_id: int
    role: str
    content: str
    status: str
    error: str | None
    stats: dict[str, Any] | None
    tool_calls: list[Any] | None

    def for_session(self) -> dict[str, Any]:
        """This message as a ChatSession history entry."""
        entry: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            entry["tool_calls"] = self.tool_calls
        return entry


def history_for_session(messages: list[StoredMessage]) -> list[dict[str, Any]]:
    """The turns the model should see: a failed answer and its question are left out.

    Stopped (partial) answers stay in, as the session keeps them too.
    """
    kept: list[StoredMessage] = []
    for message in messages:
        if message.role == "assistant" and message.status == "error":
            if kept and kept[-1].role == "user":
                kept.pop()
            continue
        kept.append(message)
    return [m.for_session() for m in kept]


def _moved_aside_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    return candidate


class ChatStore:
    """All database access. Used from the UI thread only; each call is short."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.notice: str | None = None  # set when a damaged database was replaced
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = self._open()
        except sqlite3.DatabaseError as exc:
            self.conn = self._replace_damaged(exc)

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA secure_delete = ON")
            # WAL with synchronous=NORMAL commits without an fsync: a streaming answer is
            # saved twice a second from the UI thread, and an fsync can take 20-100 ms.
            # Still safe against a crash of the app; a power cut may lose the last commits.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            # A file that is not a database only fails on its first real read.
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _replace_damaged(self, exc: sqlite3.DatabaseError) -> sqlite3.Connection:
        if str(self.path) == ":memory:" or not self.path.exists():
            raise StoreError(f"Cannot create the chat database at {self.path}: {exc}") from exc
        aside = _moved_aside_name(self.path)
        try:
            self.path.rename(aside)
            for suffix in ("-journal", "-wal", "-shm"):
                companion = self.path.with_name(self.path.name + suffix)
                if companion.exists():
                    companion.rename(aside.with_name(aside.name + suffix))
            conn = self._open()
        except (OSError, sqlite3.DatabaseError) as second:
            self.notice = (
                f"The chat database {self.path} cannot be read ({exc}) nor replaced "
                f"({second}); chats in this session will not be saved."
            )
            self.path = Path(":memory:")
            return self._open()
        self.notice = (
            f"The chat database could not be read ({exc}). It was moved to {aside} "
            f"and a new, empty one was made."
        )
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        if done and max(done) > len(MIGRATIONS):
            raise StoreError(
                f"The chat database was written by a newer granite-mlx "
                f"(schema {max(done)}, this version knows {len(MIGRATIONS)}). Upgrade, or "
                f"pass another data folder with --data-dir."
            )
        for version, script in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            # executescript commits first, so run each statement inside our transaction.
            conn.execute("BEGIN")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time()))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        row = self.conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        self.conn.close()

    # --- chats ----------------------------------------------------------------------------

    @staticmethod
    def _chat(row: sqlite3.Row) -> Chat:
        return Chat(
            id=row["id"],
            title=row["title"],
            system=row["system"],
            model=row["model"],
            settings=json.loads(row["settings"]) if row["settings"] else {},
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    def create_chat(
        self,
        title: str,
        system: str | None = None,
        model: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> Chat:
        now = time.time()
        cursor = self.conn.execute(
            "INSERT INTO chats (title, system, model, settings, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (title, system, model, json.dumps(settings or {}), now, now),
        )
        chat = self.get_chat(int(cursor.lastrowid or 0))
        assert chat is not None
        return chat

    def get_chat(self, chat_id: int) -> Chat | None:
        row = self.conn.execute("SELECT * FROM chats WHERE id = ?", (chat_id,)).fetchone()
        return self._chat(row) if row else None

    def list_chats(self) -> list[Chat]:
        rows = self.conn.execute("SELECT * FROM chats ORDER BY updated_at DESC, id DESC")
        return [self._chat(row) for row in rows]

    def update_chat(self, chat_id: int, **fields: Any) -> None:
        """Set title, system, model or settings (settings as a dict)."""
        allowed = {"title", "system", "model", "settings"}
        if unknown := set(fields) - allowed:
            raise ValueError(f"unknown chat fields: {sorted(unknown)}")
        if "settings" in fields:
            fields["settings"] = json.dumps(fields["settings"])
        fields["updated_at"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.conn.execute(
            f"UPDATE chats SET {assignments} WHERE id = ?", (*fields.values(), chat_id)
        )

    def delete_chat(self, chat_id: int) -> None:
        """Delete the chat and (by cascade) its messages, leaving no text behind.

        secure_delete zeroes the freed space in the database pages; VACUUM rebuilds the
        file without them; the checkpoint moves everything out of the write-ahead log
        and truncates it, so no old copy of a page survives there either.
        """
        self.conn.execute("DELETE FROM chats WHERE id = ?", (chat_id,))
        self.conn.execute("VACUUM")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # --- messages -------------------------------------------------------------------------

    @staticmethod
    def _message(row: sqlite3.Row) -> StoredMessage:
        return StoredMessage(
            id=row["id"],
            chat_id=row["chat_id"],
            role=row["role"],
            content=row["content"],
            status=row["status"],
            error=row["error"],
            stats=json.loads(row["stats"]) if row["stats"] else None,
            tool_calls=json.loads(row["tool_calls"]) if row["tool_calls"] else None,
        )

    def add_message(
        self, chat_id: int, role: str, content: str = "", status: str = "done"
    ) -> StoredMessage:
        now = time.time()
        cursor = self.conn.execute(
            "INSERT INTO messages (chat_id, role, content, status, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (chat_id, role, content, status, now),
        )
        self.conn.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (now, chat_id))
        message = self.get_message(int(cursor.lastrowid or 0))
        assert message is not None
        return message

    def get_message(self, message_id: int) -> StoredMessage | None:
        row = self.conn.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        return self._message(row) if row else None

    def messages(self, chat_id: int) -> list[StoredMessage]:
        rows = self.conn.execute("SELECT * FROM messages WHERE chat_id = ? ORDER BY id", (chat_id,))
        return [self._message(row) for row in rows]

    def update_message(
        self,
        message_id: int,
        *,
        content: str | None = None,
        status: str | None = None,
        error: str | None = None,
        stats: dict[str, Any] | None = None,
        tool_calls: list[Any] | None = None,
    ) -> None:
        fields: dict[str, Any] = {}
        if content is not None:
            fields["content"] = content
        if status is not None:
            fields["status"] = status
        if error is not None:
            fields["error"] = error
        if stats is not None:
            fields["stats"] = json.dumps(stats)
        if tool_calls is not None:
            fields["tool_calls"] = json.dumps(tool_calls)
        if not fields:
            return
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.conn.execute(
            f"UPDATE messages SET {assignments} WHERE id = ?", (*fields.values(), message_id)
        )

    def delete_messages_from(self, chat_id: int, message_id: int) -> None:
        """Delete this message and every later one in the chat (edit and regenerate)."""
        self.conn.execute(
            "DELETE FROM messages WHERE chat_id = ? AND id >= ?", (chat_id, message_id)
        )

    def mark_interrupted(self) -> int:
        """Answers still 'streaming' were cut off by a crash: call them stopped."""
        cursor = self.conn.execute(
            "UPDATE messages SET status = 'stopped' WHERE status = 'streaming'"
        )
        return cursor.rowcount
