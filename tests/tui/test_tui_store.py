"""The SQLite chat store: migrations, deletes that leave no text, damaged files."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from granite_mlx.tui import store as store_module
from granite_mlx.tui.store import (
    DATA_DIR_ENV,
    MIGRATIONS,
    ChatStore,
    StoreError,
    StoreLocked,
    default_data_dir,
    ensure_private_dir,
    history_for_session,
)


def test_new_database_is_migrated_with_foreign_keys_and_secure_delete(tmp_path: Path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    assert store.schema_version == len(MIGRATIONS)
    assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    store.close()
    # Opening again runs nothing twice.
    store = ChatStore(tmp_path / "chats.sqlite3")
    versions = store.conn.execute("SELECT version FROM schema_migrations").fetchall()
    assert [v[0] for v in versions] == list(range(1, len(MIGRATIONS) + 1))
    assert store.notice is None


def test_delete_chat_cascades_and_leaves_no_text_in_files(tmp_path: Path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    keep = store.create_chat("keep")
    store.add_message(keep.id, "user", "harmless")
    gone = store.create_chat("gone")
    for n in range(50):  # enough text to span several pages
        store.add_message(gone.id, "user", f"okapi-secret-{n} " * 40)
    store.delete_chat(gone.id)
    assert store.get_chat(gone.id) is None
    count = store.conn.execute("SELECT COUNT(*) FROM messages WHERE chat_id = ?", (gone.id,))
    assert count.fetchone()[0] == 0
    assert [m.content for m in store.messages(keep.id)] == ["harmless"]
    for path in tmp_path.iterdir():  # the database, its -wal and -shm files
        # Not even single words: the search index keeps words, not the text.
        assert b"okapi" not in path.read_bytes(), path.name


def test_foreign_keys_reject_orphan_messages(tmp_path: Path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    with pytest.raises(sqlite3.IntegrityError):
        store.add_message(999, "user", "nobody's")


def test_damaged_database_is_moved_aside(tmp_path: Path):
    path = tmp_path / "chats.sqlite3"
    path.write_bytes(b"\x00garbage" * 512)
    store = ChatStore(path)
    moved = list(tmp_path.glob("chats.sqlite3.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == b"\x00garbage" * 512
    assert store.notice is not None and str(moved[0]) in store.notice
    assert store.list_chats() == []
    store.create_chat("works")


def test_truncated_database_is_moved_aside(tmp_path: Path):
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    chat = store.create_chat("x")
    for _ in range(200):
        store.add_message(chat.id, "user", "y" * 500)
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    store = ChatStore(path)
    assert store.notice is not None
    assert list(tmp_path.glob("chats.sqlite3.corrupt-*"))


def test_newer_schema_is_refused_not_moved(tmp_path: Path):
    path = tmp_path / "chats.sqlite3"
    ChatStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreError, match="newer"):
        ChatStore(path)
    assert path.exists() and not list(tmp_path.glob("*.corrupt-*"))


def test_history_leaves_out_failed_turns_but_keeps_stopped_answers(tmp_path: Path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    chat = store.create_chat("t")
    store.add_message(chat.id, "user", "one")
    store.add_message(chat.id, "assistant", "partial", status="stopped")
    store.add_message(chat.id, "user", "two")
    store.add_message(chat.id, "assistant", "bro", status="error")
    store.add_message(chat.id, "user", "three")
    answer = store.add_message(chat.id, "assistant", "ok")
    store.update_message(answer.id, tool_calls=[{"name": "f", "arguments": {}}])
    assert history_for_session(store.messages(chat.id)) == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "partial"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "ok", "tool_calls": [{"name": "f", "arguments": {}}]},
    ]


def test_interrupted_answers_are_marked_stopped(tmp_path: Path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    chat = store.create_chat("t")
    store.add_message(chat.id, "assistant", "half", status="streaming")
    assert store.mark_interrupted() == 1
    assert store.messages(chat.id)[0].status == "stopped"


def test_data_dir_can_be_overridden(monkeypatch, tmp_path: Path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(DATA_DIR_ENV)
    assert default_data_dir().name == "granite-mlx"


# --- issue 10 §2: no chat lost -----------------------------------------------------------


def _filled(path: Path) -> None:
    store = ChatStore(path)
    chat = store.create_chat("keep me", settings={"temperature": 0.3})
    store.add_message(chat.id, "user", "precious words")
    store.close()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_locked_database_is_retried_then_reported_and_kept(tmp_path: Path):
    path = tmp_path / "chats.sqlite3"
    _filled(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    started = time.monotonic()
    with pytest.raises(StoreLocked, match="locked by another program"):
        ChatStore(path, lock_wait=0.5)
    assert time.monotonic() - started >= 0.5  # it waited before giving up
    holder.execute("ROLLBACK")
    holder.close()
    assert not list(tmp_path.glob("*.corrupt-*"))
    assert [c.title for c in ChatStore(path).list_chats()] == ["keep me"]


def test_lock_released_while_waiting_opens_normally(tmp_path: Path):
    path = tmp_path / "chats.sqlite3"
    _filled(path)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.3, lambda: (holder.execute("ROLLBACK"), holder.close())).start()
    store = ChatStore(path, lock_wait=5)
    assert [c.title for c in store.list_chats()] == ["keep me"] and store.notice is None


@pytest.mark.parametrize(
    ("name", "message"),
    [("SQLITE_IOERR_READ", "disk I/O error"), ("SQLITE_FULL", "database or disk is full")],
)
def test_io_error_at_start_is_reported_and_the_file_kept(tmp_path: Path, monkeypatch, name, message):
    path = tmp_path / "chats.sqlite3"
    _filled(path)
    before = _snapshot(tmp_path)

    def failing_connect(*args, **kwargs):
        error = sqlite3.OperationalError(message)
        error.sqlite_errorname = name  # as SQLite sets it (Python 3.11+)
        raise error

    monkeypatch.setattr(store_module.sqlite3, "connect", failing_connect)
    with pytest.raises(StoreError, match=f"{message}. The file was left as it is"):
        ChatStore(path)
    assert _snapshot(tmp_path) == before


def test_database_that_cannot_be_opened_is_reported_not_moved(tmp_path: Path):
    path = tmp_path / "chats.sqlite3"
    path.mkdir()  # a folder where the file should be: SQLite cannot open it
    with pytest.raises(StoreError, match="left as it is"):
        ChatStore(path)
    assert path.is_dir() and not list(tmp_path.glob("*.corrupt-*"))


@contextlib.contextmanager
def read_only_file(path: Path):
    """A file this process cannot write: immutable for root (who ignores modes), 0444 else."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        os.chmod(path, 0o444)
        try:
            yield
        finally:
            os.chmod(path, 0o600)


def test_read_only_database_opens_with_a_notice_and_works_in_memory(tmp_path: Path):
    path = tmp_path / "chats.sqlite3"
    _filled(path)
    before = path.read_bytes()
    with read_only_file(path):
        store = ChatStore(path)
        assert store.read_only and "read-only" in store.notice and "nothing is saved" in store.notice
        (chat,) = store.list_chats()
        assert [m.content for m in store.messages(chat.id)] == ["precious words"]
        assert store.search("precious")[0].chat.id == chat.id
        store.add_message(chat.id, "user", "only in memory")  # works, on the copy
        store.close()
    assert path.read_bytes() == before


def test_newer_schema_leaves_the_file_untouched(tmp_path: Path):
    path = tmp_path / "chats.sqlite3"
    _filled(path)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (len(MIGRATIONS) + 1,))
    conn.close()
    before = _snapshot(tmp_path)
    with pytest.raises(StoreError, match="newer granite-mlx .* it was not changed"):
        ChatStore(path)
    assert _snapshot(tmp_path) == before  # not even a -wal or -shm file appeared


def test_another_programs_database_is_refused_untouched(tmp_path: Path):
    path = tmp_path / "chats.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    conn.close()
    before = _snapshot(tmp_path)
    with pytest.raises(StoreError, match="not a granite-mlx chat database"):
        ChatStore(path)
    assert _snapshot(tmp_path) == before


def test_rows_with_bad_json_are_named_and_the_rest_is_read(tmp_path: Path):
    path = tmp_path / "chats.sqlite3"
    _filled(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE chats SET settings = '{broken'")
        conn.execute("UPDATE messages SET stats = 'nope', tool_calls = '[1,'")
    conn.close()
    store = ChatStore(path)
    (chat,) = store.list_chats()
    assert chat.title == "keep me" and chat.settings == {}
    (message,) = store.messages(chat.id)
    assert message.content == "precious words" and message.stats is None
    assert message.tool_calls is None
    assert store.problems == [
        "chat 1 (“keep me”): its sampling settings",
        "message 1 of chat 1: its statistics",
        "message 1 of chat 1: its tool calls",
    ]


def test_deleted_text_is_checkpointed_out_of_the_wal_once_a_reader_lets_go(tmp_path: Path):
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    chat = store.create_chat("gone")
    for n in range(20):
        store.add_message(chat.id, "user", f"okapi-secret-{n} " * 40)
    store.checkpoint()
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM messages").fetchone()  # holds a snapshot
    assert store.delete_chat(chat.id) is False  # the log cannot be emptied yet
    assert store.checkpoint() is False
    reader.execute("COMMIT")
    reader.close()
    assert store.checkpoint() is True
    for file in tmp_path.iterdir():
        assert b"okapi" not in file.read_bytes(), file.name


def test_files_holding_conversations_are_private(tmp_path: Path):
    folder = tmp_path / "new" / "data"
    store = ChatStore(folder / "chats.sqlite3")
    store.add_message(store.create_chat("x").id, "user", "private")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700  # made here too
    for file in folder.iterdir():  # the database and its -wal / -shm files
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name


def test_data_dir_errors_name_the_problem(tmp_path: Path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        ensure_private_dir(tmp_path / "a-file")
    with pytest.raises(StoreError, match="Cannot create the data folder .*: Not a directory"):
        ensure_private_dir(tmp_path / "a-file" / "below")


def test_text_that_cannot_be_encoded_is_stored_safely(tmp_path: Path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    chat = store.create_chat("bad \ud800 title")
    message = store.add_message(chat.id, "assistant", "half \udc80 a pair")
    store.update_message(message.id, content="still \ud800 bad")
    assert store.get_chat(chat.id).title == "bad \ufffd title"
    assert store.messages(chat.id)[0].content == "still \ufffd bad"


# --- search ------------------------------------------------------------------------------


def _search_fixture(store: ChatStore) -> tuple[int, int]:
    birds = store.create_chat("Birds")
    store.add_message(birds.id, "user", "Where do puffins nest?")
    store.add_message(birds.id, "assistant", "Puffins nest in burrows on cliffs.")
    code = store.create_chat("Code 100%")
    store.add_message(code.id, "user", "Explain snake_case names")
    return birds.id, code.id


def test_search_with_fts5(tmp_path: Path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    assert store.search_mode == "fts5"
    birds, code = _search_fixture(store)
    (hit,) = store.search("puffin burrow")  # every word, as a prefix
    assert hit.chat.id == birds and "[burrows]" in hit.snippet
    assert [h.chat.id for h in store.search("snake_case")] == [code]
    assert [h.chat.id for h in store.search('100% "')] == [code]  # title; no FTS syntax errors
    assert store.search("walrus") == [] and store.search("  ") == []


def test_search_falls_back_to_like_without_fts5(tmp_path: Path, monkeypatch):
    path = tmp_path / "chats.sqlite3"
    fts = ChatStore(path)  # first made with the index and its triggers
    fts.close()
    monkeypatch.setattr(ChatStore, "fts5_available", staticmethod(lambda conn: False))
    store = ChatStore(path)
    assert store.search_mode == "like"
    birds, code = _search_fixture(store)  # writes work: the triggers were dropped
    (hit,) = store.search("puffin burrow")
    assert hit.chat.id == birds and "[burrow]" in hit.snippet
    assert [h.chat.id for h in store.search("snake_case")] == [code]  # _ is not a wildcard
    assert [h.chat.id for h in store.search("100%")] == [code]
    store.close()
    monkeypatch.undo()
    store = ChatStore(path)  # FTS5 again: the index is rebuilt with what was written
    assert store.search_mode == "fts5" and store.search("puffins")[0].chat.id == birds
