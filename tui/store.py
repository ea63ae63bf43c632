"""Chats, their messages and documents, and the app's settings, in SQLite (stdlib sqlite3).

The schema is versioned: each entry of MIGRATIONS runs once, recorded in
``schema_migrations``. Foreign keys are on, so deleting a chat deletes its messages
and documents, and a delete leaves no text in the files (see ``delete_chat``).

Opening never loses a chat. What happens to a database that cannot be used as is:

* not a database, or it fails SQLite's integrity check: moved aside (renamed with a
  timestamp) and a new one made, with a notice. The only case that moves the file.
* locked by another process: retried for ``lock_wait`` seconds, then ``StoreLocked``.
* an I/O error, a full disk, a file that cannot be opened: ``StoreError`` naming the
  file and the cause; the file is left as it is.
* read-only (permissions, a read-only disk): copied into memory. Everything works,
  nothing is saved, and ``notice`` says so.
* written by a newer version, or not a chat database at all: ``StoreError``; checked on
  a read-only connection before anything is written, so the file is not touched.
* a row whose JSON cannot be read: shown with that field empty, and named in
  ``problems``.

Search uses an FTS5 index over message text where SQLite has FTS5, kept in step by
triggers; without FTS5 it falls back to LIKE (``search_mode`` says which).

Files hold conversations, so they are the user's alone: a folder made here is 0700,
the database 0600 (SQLite gives its -wal and -shm files the database file's mode).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from granite_mlx.errors import GraniteError

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
    # 2: answer variants, documents, app-wide settings, remembered model folders, and
    #    the index of session cache files (their model, size and last use).
    """
    ALTER TABLE messages ADD COLUMN reply_to INTEGER;   -- an answer: the user message it answers
    ALTER TABLE messages ADD COLUMN hidden INTEGER NOT NULL DEFAULT 0;  -- an earlier variant
    CREATE TABLE documents (
        id INTEGER PRIMARY KEY,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        title TEXT NOT NULL,
        text TEXT NOT NULL,
        source TEXT,                -- the path it was read from
        added_at REAL NOT NULL
    );
    CREATE INDEX documents_by_chat ON documents(chat_id, id);
    CREATE TABLE app_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);   -- JSON values
    CREATE TABLE models (name TEXT PRIMARY KEY, used_at REAL NOT NULL);
    CREATE TABLE session_files (
        chat_id INTEGER PRIMARY KEY REFERENCES chats(id) ON DELETE CASCADE,
        model TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        used_at REAL NOT NULL
    );
    """,
]

# The full-text index: external content (the text lives once, in messages), kept in step
# by triggers. Not a migration: the same file may be opened by a Python whose SQLite
# lacks FTS5, which must then drop the triggers (they would make every write fail).
FTS_TABLE = "CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='id')"
FTS_TRIGGERS = {
    "messages_fts_insert": "AFTER INSERT ON messages BEGIN "
    "INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END",
    "messages_fts_delete": "AFTER DELETE ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content); "
    "END",
    "messages_fts_update": "AFTER UPDATE OF content ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content); "
    "INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END",
}

# How long to wait for another process's lock before saying the database is locked.
LOCK_WAIT_SECONDS = 5.0
# How long one statement waits for another process's lock (a save in another instance).
BUSY_TIMEOUT_MS = 1000


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


class StoreError(GraniteError):
    """The chat database cannot be used; the message says why and what to do."""


class StoreLocked(StoreError):
    """Another process holds the database locked for longer than we wait."""


def ensure_private_dir(path: Path, what: str = "data folder") -> Path:
    """Make ``path`` (0700 for the folders made here) or raise StoreError saying why not."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise StoreError(f"The {what} {path} is a file, not a folder: pass a folder.")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for made in missing:
            os.chmod(made, 0o700)  # mkdir's mode is masked by the umask
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise StoreError(
            f"Cannot create the {what} {path}: {reason}. Pass a folder you can write to."
        ) from None
    return path


def safe_text(text: str) -> str:
    """``text`` as valid Unicode: lone surrogates (from bad input) become U+FFFD.

    SQLite and files take UTF-8, which cannot hold a lone surrogate; writing one fails.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _error_kind(exc: sqlite3.Error) -> str:
    """corrupt | locked | readonly | io, from SQLite's error code (or message on 3.10)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    message = str(exc).lower()
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or any(
        s in message for s in ("malformed", "not a database", "integrity check failed")
    ):
        return "corrupt"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in message:
        return "locked"
    if name.startswith("SQLITE_READONLY") or "readonly" in message or "read-only" in message:
        return "readonly"
    return "io"


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
    reply_to: int | None = None
    hidden: bool = False

    def for_session(self) -> dict[str, Any]:
        """This message as a ChatSession history entry."""
        entry: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            entry["tool_calls"] = self.tool_calls
        return entry


@dataclass(frozen=True)
class Document:
    id: int
    chat_id: int
    title: str
    text: str
    source: str | None

    def for_session(self) -> dict[str, str]:
        return {"title": self.title, "text": self.text}


@dataclass(frozen=True)
class SearchHit:
    chat: Chat
    snippet: str  # the matching text, matches in [brackets]


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


def _fts_terms(query: str) -> list[str]:
    return re.findall(r"\w+", query)


class ChatStore:
    """All database access. Used from the UI thread only; each call is short."""

    def __init__(self, path: Path | str, *, lock_wait: float | None = None) -> None:
        self.path = Path(path)
        self.lock_wait = LOCK_WAIT_SECONDS if lock_wait is None else lock_wait
        self.notice: str | None = None  # a damaged file was replaced, or nothing is saved
        self.problems: list[str] = []  # rows that could not be read whole
        self.read_only = False  # True: working on an in-memory copy; nothing is saved
        self.search_mode = "like"  # or "fts5"
        if str(path) == ":memory:":
            self.conn = self._prepare(sqlite3.connect(":memory:", isolation_level=None))
            return
        ensure_private_dir(self.path.parent)
        self._create_private_file()
        self.conn = self._open_with_recovery()

    # --- opening --------------------------------------------------------------------------

    def _create_private_file(self) -> None:
        """Create an empty database file as 0600 before SQLite does (as 0644)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
        except FileExistsError:
            mode = self.path.stat().st_mode
            if stat.S_ISREG(mode) and mode & (stat.S_IRWXG | stat.S_IRWXO):
                try:
                    os.chmod(self.path, 0o600)
                except OSError:
                    pass  # not ours to change; it still opens
        except OSError:
            pass  # the folder is not writable: opening says what that means

    def _open_with_recovery(self) -> sqlite3.Connection:
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                return self._open()
            except sqlite3.Error as exc:
                kind = _error_kind(exc)
                if kind == "locked" and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                if kind == "locked":
                    raise StoreLocked(
                        f"The chat database {self.path} is locked by another program (another "
                        f"granite-chat?). Close it and try again, or pass another folder with "
                        f"--data-dir."
                    ) from None
                if kind == "corrupt":
                    return self._replace_damaged(exc)
                if kind == "readonly":
                    return self._open_read_only_copy()
                raise StoreError(
                    f"Cannot use the chat database {self.path}: {exc}. The file was left as it "
                    f"is; free some disk space or check the disk, then try again."
                ) from None

    def _connect(self, uri_mode: str | None = None) -> sqlite3.Connection:
        if uri_mode is None:
            target, uri = str(self.path), False
        else:
            target, uri = f"{self.path.resolve().as_uri()}?{uri_mode}", True
        # The busy handler waits out short locks (another instance committing a save).
        return sqlite3.connect(target, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, uri=uri)

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        """Refuse a database this version must not write to. Reads only."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return  # new
        if "schema_migrations" not in tables:
            raise StoreError(
                f"{self.path} is an SQLite database but not a granite-mlx chat database; it was "
                f"not changed. Pass another folder with --data-dir."
            )
        row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        version = int(row[0] or 0)
        if version > len(MIGRATIONS):
            raise StoreError(
                f"The chat database {self.path} was written by a newer granite-mlx (schema "
                f"{version}, this version knows {len(MIGRATIONS)}); it was not changed. Upgrade "
                f"granite-mlx, or pass another folder with --data-dir."
            )

    def _open(self) -> sqlite3.Connection:
        # First a look that cannot write anything, not even a -wal or -shm file: a file
        # we must refuse is left exactly as it was. (Read-only when a write-ahead log
        # exists, whose pages are part of the database; immutable, which ignores it,
        # otherwise, since a read-only connection would create the log files.)
        wal = self.path.with_name(self.path.name + "-wal")
        has_log = wal.exists() and wal.stat().st_size > 0
        conn = self._connect("mode=ro" if has_log else "immutable=1")
        try:
            self._check_schema(conn)
        finally:
            conn.close()
        conn = self._connect()
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            # Can we write? A file opened read-only only says so on a write: rewrite the
            # header's user_version with its own value, then roll back.
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                conn.execute(f"PRAGMA user_version = {int(version)}")
            finally:
                conn.execute("ROLLBACK")
            # WAL with synchronous=NORMAL commits without an fsync: a streaming answer is
            # saved twice a second from the UI thread, and an fsync can take 20-100 ms.
            # Still safe against a crash of the app; a power cut may lose the last commits.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            return self._prepare(conn)
        except BaseException:
            conn.close()
            raise

    def _prepare(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA secure_delete = ON")
        self._migrate(conn)
        self.search_mode = self._ensure_search_index(conn)
        return conn

    def _open_read_only_copy(self) -> sqlite3.Connection:
        """Copy a database we may not write into memory, so the app works on the copy."""
        memory = sqlite3.connect(":memory:", isolation_level=None)
        for mode in ("mode=ro", "immutable=1"):  # immutable: a WAL file whose -shm we cannot make
            try:
                source = self._connect(mode)
                try:
                    source.backup(memory)
                finally:
                    source.close()
                break
            except sqlite3.Error as exc:
                last = exc
        else:
            raise StoreError(f"Cannot read the chat database {self.path}: {last}.") from None
        self.read_only = True
        self.notice = (
            f"The chat database {self.path} is read-only: chats can be read, searched and "
            f"exported, and new messages work, but nothing is saved when you quit. To save, "
            f"make the file and its folder writable (chmod u+w)."
        )
        return self._prepare(memory)

    def _replace_damaged(self, exc: sqlite3.Error) -> sqlite3.Connection:
        aside = _moved_aside_name(self.path)
        try:
            self.path.rename(aside)
            for suffix in ("-journal", "-wal", "-shm"):
                companion = self.path.with_name(self.path.name + suffix)
                if companion.exists():
                    companion.rename(aside.with_name(aside.name + suffix))
            self._create_private_file()
            conn = self._open()
        except (OSError, sqlite3.Error) as second:
            self.notice = (
                f"The chat database {self.path} cannot be read ({exc}) nor replaced "
                f"({second}); chats in this session will not be saved."
            )
            self.read_only = True
            return self._prepare(sqlite3.connect(":memory:", isolation_level=None))
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

    @staticmethod
    def fts5_available(conn: sqlite3.Connection) -> bool:
        try:
            conn.execute("CREATE VIRTUAL TABLE temp.fts5_probe USING fts5(x)")
            conn.execute("DROP TABLE temp.fts5_probe")
            return True
        except sqlite3.OperationalError:
            return False

    def _ensure_search_index(self, conn: sqlite3.Connection) -> str:
        names = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'trigger')")
        }
        if not self.fts5_available(conn):
            # Writes to messages would fail through the triggers: drop them (the index is
            # rebuilt the next time a Python with FTS5 opens the file).
            for trigger in FTS_TRIGGERS:
                if trigger in names:
                    conn.execute(f"DROP TRIGGER {trigger}")
            return "like"
        if "messages_fts" in names and all(t in names for t in FTS_TRIGGERS):
            return "fts5"
        conn.execute("BEGIN")
        try:
            if "messages_fts" not in names:
                conn.execute(FTS_TABLE)
            for trigger, body in FTS_TRIGGERS.items():
                conn.execute(f"CREATE TRIGGER IF NOT EXISTS {trigger} {body}")
            conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return "fts5"

    @property
    def schema_version(self) -> int:
        row = self.conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        self.checkpoint()
        self.conn.close()

    # --- reading rows that may be damaged ---------------------------------------------------

    def _json(self, raw: Any, what: str, default: Any) -> Any:
        if raw is None or raw == "":
            return default
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            if what not in self.problems:
                self.problems.append(what)
            return default

    # --- chats ----------------------------------------------------------------------------

    def _chat(self, row: sqlite3.Row) -> Chat:
        title = str(row["title"])
        settings = self._json(
            row["settings"], f"chat {row['id']} (“{title}”): its sampling settings", {}
        )
        return Chat(
            id=row["id"],
            title=title,
            system=row["system"],
            model=row["model"],
            settings=settings if isinstance(settings, dict) else {},
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
            (
                safe_text(title),
                safe_text(system) if system else system,
                model,
                json.dumps(settings or {}),
                now,
                now,
            ),
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
        for name in ("title", "system"):
            if isinstance(fields.get(name), str):
                fields[name] = safe_text(fields[name])
        fields["updated_at"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.conn.execute(
            f"UPDATE chats SET {assignments} WHERE id = ?", (*fields.values(), chat_id)
        )

    def delete_chat(self, chat_id: int) -> bool:
        """Delete the chat and (by cascade) its messages and documents, leaving no text.

        secure_delete zeroes the freed space in the database pages; merging the search
        index drops the deleted words from it; VACUUM rebuilds the file without the
        freed pages; the checkpoint moves everything out of the write-ahead log and
        truncates it. Returns False when another reader keeps the log from being
        truncated: call ``checkpoint()`` again later until it returns True.
        """
        self.conn.execute("DELETE FROM chats WHERE id = ?", (chat_id,))
        if self.search_mode == "fts5":
            self.conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('optimize')")
        self.conn.execute("VACUUM")
        return self.checkpoint()

    def checkpoint(self) -> bool:
        """Copy the write-ahead log into the database and empty it; False if a reader
        (another granite-chat) holds part of it."""
        if self.read_only:
            return True
        # Without waiting: the busy handler would block the UI for its whole timeout.
        self.conn.execute("PRAGMA busy_timeout = 0")
        try:
            busy, _log, _done = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error:
            return False
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return busy == 0

    # --- messages -------------------------------------------------------------------------

    def _message(self, row: sqlite3.Row) -> StoredMessage:
        where = f"message {row['id']} of chat {row['chat_id']}"
        stats = self._json(row["stats"], f"{where}: its statistics", None)
        calls = self._json(row["tool_calls"], f"{where}: its tool calls", None)
        return StoredMessage(
            id=row["id"],
            chat_id=row["chat_id"],
            role=row["role"],
            content=str(row["content"]),
            status=row["status"],
            error=row["error"],
            stats=stats if isinstance(stats, dict) else None,
            tool_calls=calls if isinstance(calls, list) else None,
            reply_to=row["reply_to"],
            hidden=bool(row["hidden"]),
        )

    def add_message(
        self,
        chat_id: int,
        role: str,
        content: str = "",
        status: str = "done",
        reply_to: int | None = None,
    ) -> StoredMessage:
        now = time.time()
        cursor = self.conn.execute(
            "INSERT INTO messages (chat_id, role, content, status, reply_to, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (chat_id, role, safe_text(content), status, reply_to, now),
        )
        self.conn.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (now, chat_id))
        message = self.get_message(int(cursor.lastrowid or 0))
        assert message is not None
        return message

    def get_message(self, message_id: int) -> StoredMessage | None:
        row = self.conn.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        return self._message(row) if row else None

    def messages(self, chat_id: int) -> list[StoredMessage]:
        """The chat's messages as shown: earlier variants of an answer left out."""
        rows = self.conn.execute(
            "SELECT * FROM messages WHERE chat_id = ? AND hidden = 0 ORDER BY id", (chat_id,)
        )
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
            fields["content"] = safe_text(content)
        if status is not None:
            fields["status"] = status
        if error is not None:
            fields["error"] = safe_text(error)
        if stats is not None:
            fields["stats"] = json.dumps(stats)
        if tool_calls is not None:
            fields["tool_calls"] = safe_text(json.dumps(tool_calls))
        if not fields:
            return
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.conn.execute(
            f"UPDATE messages SET {assignments} WHERE id = ?", (*fields.values(), message_id)
        )

    def delete_messages_from(self, chat_id: int, message_id: int) -> None:
        """Delete this message and every later one in the chat (edit and retry)."""
        self.conn.execute(
            "DELETE FROM messages WHERE chat_id = ? AND id >= ?", (chat_id, message_id)
        )

    def mark_interrupted(self) -> int:
        """Answers still 'streaming' were cut off by a crash: call them stopped."""
        cursor = self.conn.execute(
            "UPDATE messages SET status = 'stopped' WHERE status = 'streaming'"
        )
        return cursor.rowcount

    # --- answer variants --------------------------------------------------------------------

    def variants(self, reply_to: int) -> list[StoredMessage]:
        """Every answer given to the user message ``reply_to``, oldest first."""
        rows = self.conn.execute(
            "SELECT * FROM messages WHERE reply_to = ? AND role = 'assistant' ORDER BY id",
            (reply_to,),
        )
        return [self._message(row) for row in rows]

    def hide_message(self, message_id: int, reply_to: int) -> None:
        """Keep an answer to ``reply_to`` as an earlier variant: stored, not shown, not
        sent to the model."""
        self.conn.execute(
            "UPDATE messages SET hidden = 1, reply_to = ? WHERE id = ?", (reply_to, message_id)
        )

    def variant_ids(self, chat_id: int) -> dict[int, list[int]]:
        """For each question of the chat with more than one answer: the answers' ids."""
        rows = self.conn.execute(
            "SELECT reply_to, id FROM messages WHERE chat_id = ? AND role = 'assistant' "
            "AND reply_to IS NOT NULL ORDER BY id",
            (chat_id,),
        )
        found: dict[int, list[int]] = {}
        for reply_to, message_id in rows:
            found.setdefault(reply_to, []).append(message_id)
        return {k: v for k, v in found.items() if len(v) > 1}

    def show_variant(self, message_id: int) -> None:
        """Make this answer the one shown for its question (its siblings are hidden)."""
        message = self.get_message(message_id)
        if message is None or message.reply_to is None:
            return
        self.conn.execute("BEGIN")
        self.conn.execute(
            "UPDATE messages SET hidden = (id != ?) WHERE reply_to = ? AND role = 'assistant'",
            (message_id, message.reply_to),
        )
        self.conn.execute("COMMIT")

    # --- documents ------------------------------------------------------------------------

    def add_document(
        self, chat_id: int, title: str, text: str, source: str | None = None
    ) -> Document:
        cursor = self.conn.execute(
            "INSERT INTO documents (chat_id, title, text, source, added_at) VALUES (?, ?, ?, ?, ?)",
            (chat_id, safe_text(title), safe_text(text), source, time.time()),
        )
        row = self.conn.execute(
            "SELECT * FROM documents WHERE id = ?", (cursor.lastrowid,)
        ).fetchone()
        return self._document(row)

    @staticmethod
    def _document(row: sqlite3.Row) -> Document:
        return Document(row["id"], row["chat_id"], row["title"], str(row["text"]), row["source"])

    def documents(self, chat_id: int) -> list[Document]:
        rows = self.conn.execute(
            "SELECT * FROM documents WHERE chat_id = ? ORDER BY id", (chat_id,)
        )
        return [self._document(row) for row in rows]

    def remove_document(self, document_id: int) -> None:
        self.conn.execute("DELETE FROM documents WHERE id = ?", (document_id,))

    # --- search ---------------------------------------------------------------------------

    def search(self, query: str, limit: int = 50) -> list[SearchHit]:
        """Chats whose title or message text holds every word of ``query``, best first."""
        terms = _fts_terms(query)
        if not terms:
            return []
        hits: dict[int, str] = {}
        if self.search_mode == "fts5":
            match = " ".join(f'"{t}"*' for t in terms)  # quoted: no FTS syntax from the user
            rows = self.conn.execute(
                "SELECT m.chat_id, snippet(messages_fts, 0, '[', ']', '…', 10) "
                "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
                "WHERE messages_fts MATCH ? AND m.hidden = 0 ORDER BY rank LIMIT ?",
                (match, limit * 5),
            )
        else:
            where = " AND ".join("content LIKE ? ESCAPE '\\'" for _ in terms)
            rows = self.conn.execute(
                f"SELECT chat_id, content FROM messages WHERE hidden = 0 AND {where} "
                f"ORDER BY id DESC LIMIT ?",
                (*(f"%{_like_escape(t)}%" for t in terms), limit * 5),
            )
        for chat_id, text in rows:
            if chat_id not in hits:
                hits[chat_id] = text if self.search_mode == "fts5" else _like_snippet(text, terms)
        title_where = " AND ".join("title LIKE ? ESCAPE '\\'" for _ in terms)
        for (chat_id,) in self.conn.execute(
            f"SELECT id FROM chats WHERE {title_where} ORDER BY updated_at DESC",
            tuple(f"%{_like_escape(t)}%" for t in terms),
        ):
            hits.setdefault(chat_id, "")
        result = []
        for chat_id, snippet in list(hits.items())[:limit]:
            chat = self.get_chat(chat_id)
            if chat is not None:
                result.append(SearchHit(chat, " ".join(snippet.split())))
        return result

    # --- app-wide settings and remembered models -------------------------------------------

    def get_setting(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM app_settings WHERE key = ?", (key,)).fetchone()
        if row is None:
            return default
        return self._json(row[0], f"the app setting {key!r}", default)

    def set_setting(self, key: str, value: Any) -> None:
        self.conn.execute(
            "INSERT INTO app_settings (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, safe_text(json.dumps(value))),
        )

    def remember_model(self, name: str) -> None:
        self.conn.execute(
            "INSERT INTO models (name, used_at) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET used_at = excluded.used_at",
            (name, time.time()),
        )

    def remembered_models(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM models ORDER BY used_at DESC")]

    # --- the session cache index ---------------------------------------------------------------

    def record_session_file(self, chat_id: int, model: str, size: int) -> None:
        self.conn.execute(
            "INSERT INTO session_files (chat_id, model, bytes, used_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(chat_id) DO UPDATE SET model = excluded.model, bytes = excluded.bytes, "
            "used_at = excluded.used_at",
            (chat_id, model, size, time.time()),
        )

    def touch_session_file(self, chat_id: int) -> None:
        self.conn.execute(
            "UPDATE session_files SET used_at = ? WHERE chat_id = ?", (time.time(), chat_id)
        )

    def session_file(self, chat_id: int) -> tuple[str, int, float] | None:
        """(model, bytes, used_at) of the chat's session file, if one is recorded."""
        row = self.conn.execute(
            "SELECT model, bytes, used_at FROM session_files WHERE chat_id = ?", (chat_id,)
        ).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def session_files(self) -> dict[int, tuple[str, int, float]]:
        rows = self.conn.execute("SELECT chat_id, model, bytes, used_at FROM session_files")
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def forget_session_file(self, chat_id: int) -> None:
        self.conn.execute("DELETE FROM session_files WHERE chat_id = ?", (chat_id,))


def _like_escape(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like_snippet(text: str, terms: list[str], width: int = 60) -> str:
    """Text around the first match, the matches in [brackets] (as FTS5's snippet())."""
    lower = text.lower()
    first = min((i for t in terms if (i := lower.find(t.lower())) >= 0), default=0)
    start = max(0, first - width // 3)
    piece = text[start : start + width]
    for term in terms:
        piece = re.sub(f"({re.escape(term)})", r"[\1]", piece, flags=re.IGNORECASE)
    return ("…" if start else "") + piece + ("…" if start + width < len(text) else "")
