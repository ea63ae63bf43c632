"""The SQLite chat store: migrations, deletes that leave no text, damaged files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from granite_mlx.tui.store import (
    DATA_DIR_ENV,
    MIGRATIONS,
    ChatStore,
    StoreError,
    default_data_dir,
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
        assert b"okapi-secret" not in path.read_bytes(), path.name


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
