"""Issue 10 §2 and §3 in the app and on its command line: no chat is lost, and every
mistake with the data folder or the options is one line and exit 1."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from granite_mlx.tui.app import main as granite_chat_main
from granite_mlx.tui.export import export_chat
from granite_mlx.tui.fake_engine import default_reply
from granite_mlx.tui.screens import ConfirmScreen
from granite_mlx.tui.store import ChatStore
from test_tui_store import read_only_file
from tui_pilot_helpers import key, rows, run_command, send, views, wait_for, wait_ready

from granite_mlx.cli import main as granite_mlx_main

SIZE = (100, 32)


async def test_sending_into_a_chat_another_instance_deleted_keeps_the_text(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello")
        # Another granite-chat deletes this chat.
        with sqlite3.connect(data_dir / "chats.sqlite3") as other:
            other.execute("PRAGMA foreign_keys = ON")
            other.execute("DELETE FROM chats")
        other.close()
        app.prompt.load_text("my carefully typed question")
        await key(pilot, "enter")
        await pilot.pause()
        assert app.is_running
        assert app.prompt.text == "my carefully typed question"
        assert app.chat is None and not views(app)
        assert any("was deleted" in n.message for n in app._notifications)
        await key(pilot, "enter")  # sent again: into a new chat
        await wait_for(pilot, lambda: len(views(app)) == 2 and views(app)[-1].status == "done")
        assert views(app)[-1].content == default_reply("my carefully typed question")
    assert rows(data_dir, "SELECT content FROM messages WHERE role = 'user'") == [
        ("my carefully typed question",)
    ]


async def test_bad_rows_are_named_at_start_and_the_chat_still_opens(make_app, data_dir):
    store = ChatStore(data_dir / "chats.sqlite3")
    chat = store.create_chat("Old chat", settings={"temperature": 0.1})
    store.add_message(chat.id, "user", "still here")
    store.close()
    with sqlite3.connect(data_dir / "chats.sqlite3") as conn:
        conn.execute("UPDATE chats SET settings = 'not json'")
    conn.close()
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        notices = [n.message for n in app._notifications]
        assert any("chat 1 (“Old chat”): its sampling settings" in n for n in notices)
        await pilot.click(f"#chat-{chat.id}")
        await wait_for(pilot, lambda: len(views(app)) == 1)
        assert views(app)[0].content == "still here"
        assert app.settings.temperature == 0.7  # the defaults stand in


async def test_read_only_database_opens_with_a_notice(make_app, data_dir):
    store = ChatStore(data_dir / "chats.sqlite3")
    store.add_message(store.create_chat("Saved").id, "user", "hello")
    store.close()
    path = data_dir / "chats.sqlite3"
    before = path.read_bytes()
    with read_only_file(path):
        app = make_app()
        async with app.run_test(size=SIZE) as pilot:
            await wait_ready(pilot)
            assert app.query_one("#read-only").display
            assert any("read-only" in n.message for n in app._notifications)
            await send(pilot, "this works but is not kept")
            assert views(app)[-1].status == "done"
    assert path.read_bytes() == before


async def test_deleted_chat_text_leaves_the_wal_after_another_reader_closes(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "okapi-secret " * 50)
        reader = sqlite3.connect(data_dir / "chats.sqlite3", isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM messages").fetchone()
        await run_command(pilot, "Delete chat")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: app._checkpoint_timer is not None, what="a retry")
        assert any("keeps trying" in n.message for n in app._notifications)
        reader.execute("COMMIT")
        reader.close()
        await wait_for(pilot, lambda: app._checkpoint_timer is None, what="the checkpoint")
        for file in data_dir.iterdir():
            if file.is_file():
                assert b"okapi" not in file.read_bytes(), file.name


async def test_conversation_files_are_readable_by_the_user_only(make_app, data_dir, export_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello")
        app.action_export()
        session_file = app.session_cache.path(app.chat.id)
    for folder in (data_dir, data_dir / "sessions", export_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for file in (data_dir / "chats.sqlite3", session_file, app.last_export):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_export_is_atomic_and_survives_text_that_cannot_be_encoded(tmp_path: Path, monkeypatch):
    store = ChatStore(tmp_path / "chats.sqlite3")
    chat = store.create_chat("Export")
    store.add_message(chat.id, "user", "first version")
    folder = tmp_path / "out"
    path = export_chat(chat, store.messages(chat.id), folder)
    # A lone surrogate (as bad input can leave in memory) no longer breaks the export.
    bad = store.messages(chat.id)[0]
    bad = type(bad)(**{**bad.__dict__, "content": "broken \ud800 text"})
    assert export_chat(chat, [bad], folder) == path
    assert "broken \ufffd text" in path.read_text(encoding="utf-8")
    # A failure while writing leaves the earlier export whole, and no partial file.
    good = path.read_bytes()

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        export_chat(chat, store.messages(chat.id), folder)
    assert path.read_bytes() == good
    assert [p.name for p in folder.iterdir()] == [path.name]


# --- the command line: one line, exit 1 -------------------------------------------------


@pytest.fixture(params=["granite-chat", "granite-mlx chat"])
def chat_command(request):
    """Run the chat's command line as either program name."""

    def run(argv: list[str]) -> int:
        if request.param == "granite-chat":
            return granite_chat_main(argv)
        return granite_mlx_main(["chat", *argv])

    return run


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_data_dir_naming_a_file(chat_command, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    assert chat_command(["--data-dir", str(tmp_path / "notes.txt"), "--fake-engine"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.endswith(f"The data folder {tmp_path / 'notes.txt'} is a file, not a folder: pass a folder.")


def test_data_dir_that_cannot_be_created(chat_command, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    target = tmp_path / "notes.txt" / "chats"
    assert chat_command(["--data-dir", str(target), "--fake-engine"]) == 1
    line = one_line(capsys.readouterr().err)
    assert f"Cannot create the data folder {target}: Not a directory" in line
    assert "Pass a folder you can write to" in line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--temperature", "nan"], "--temperature/--temp: must be a finite number, not 'nan'"),
        (["--max-tokens", "many"], "--max-tokens: 'many' is not a whole number"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["--temperature", "-1"], "--temperature: Temperature must be a number from 0 to 5"),
        (["--max-tokens", "0"], "--max-tokens: Max tokens must be a whole number, 1 or more."),
        (["--session-cache-mb", "0"], "--session-cache-mb must be 1 or more"),
        (["--system", " "], "--system is empty"),
    ],
)
def test_bad_options_are_one_line(chat_command, tmp_path, capsys, argv, expected):
    assert chat_command([*argv, "--data-dir", str(tmp_path), "--fake-engine"]) == 1
    assert expected in one_line(capsys.readouterr().err)


def test_locked_database_is_one_line(tmp_path, capsys, monkeypatch):
    ChatStore(tmp_path / "chats.sqlite3").close()
    monkeypatch.setattr("granite_mlx.tui.store.LOCK_WAIT_SECONDS", 0.2)
    holder = sqlite3.connect(tmp_path / "chats.sqlite3", isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert granite_chat_main(["--data-dir", str(tmp_path), "--fake-engine"]) == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    line = one_line(capsys.readouterr().err)
    assert line.startswith("granite-chat: error: The chat database") and "is locked" in line
