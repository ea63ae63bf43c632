"""The chat app driven through Pilot against the scripted fake engine."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from granite_mlx.tui.app import GraniteChatApp
from granite_mlx.tui.fake_engine import FakeEngine, FakeScript, default_reply
from granite_mlx.tui.protocol import LoadProgress
from granite_mlx.tui.screens import ConfirmScreen, SettingsScreen, TextEditScreen
from granite_mlx.tui.widgets import ChatList, ToolCallBlock
from textual.widgets import Input, ProgressBar, TextArea
from textual.widgets._markdown import MarkdownFence
from tui_pilot_helpers import (
    footer_text,
    key,
    rows,
    run_command,
    send,
    stream_some,
    views,
    wait_answer,
    wait_for,
    wait_ready,
)

SIZE = (100, 32)


async def test_send_streams_markdown_answer_with_stats(make_app, data_dir):
    app = make_app(FakeScript(delay=0.05))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello there", wait=False, typed=True)
        answer = views(app)[-1]
        # Seen while streaming: partial text, no stats yet.
        await wait_for(pilot, lambda: len(answer.content) > 10, what="streamed text")
        assert answer.status == "streaming"
        await wait_answer(pilot)
        user, answer = views(app)
        assert user.role == "user" and user.content == "hello there"
        assert answer.content == default_reply("hello there")
        assert answer.status == "done"
        assert answer.query(MarkdownFence), "the code block is rendered as a fence"
        assert footer_text(answer) == (
            "first token 0.25 s · prompt 4 tokens (0 cached) · 20 tokens · 64.0 tok/s · "
            "peak 0.75 GB"
        )
        assert app.prompt.text == ""
    stored = rows(data_dir, "SELECT role, content, status FROM messages ORDER BY id")
    assert stored == [
        ("user", "hello there", "done"),
        ("assistant", default_reply("hello there"), "done"),
    ]
    assert rows(data_dir, "SELECT title FROM chats") == [("hello there",)]


async def test_enter_sends_and_shift_enter_or_ctrl_j_add_newlines(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        app.prompt.focus()
        await pilot.press("a", "shift+enter", "b", "ctrl+j", "c")
        assert app.prompt.text == "a\nb\nc"
        assert not views(app)
        await pilot.press("enter")
        await wait_answer(pilot)
        assert views(app)[0].content == "a\nb\nc"


async def test_escape_stops_and_keeps_partial_answer_marked_stopped(make_app, data_dir):
    app = make_app(FakeScript(delay=0.01))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        answer = await stream_some(pilot, 40)
        await key(pilot, "escape")
        await wait_answer(pilot)
        full = default_reply("a long one please")
        assert answer.status == "stopped"
        assert answer.has_class("-stopped")
        assert 40 < len(answer.content) < len(full)
        assert full.startswith(answer.content)
        assert footer_text(answer).startswith("stopped · ")
        # The session keeps the partial answer as part of the history.
        assert app.engine.session.messages[-1] == {"role": "assistant", "content": answer.content}
        content = answer.content
    assert rows(data_dir, "SELECT content, status FROM messages WHERE role='assistant'") == [
        (content, "stopped")
    ]


async def test_regenerate_replaces_last_answer(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello")
        first = views(app)[-1]
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: views(app)[-1] is not first, what="a new answer")
        await wait_answer(pilot)
        _user, answer = views(app)
        assert answer.status == "done" and answer.content == first.content
        assert [m["role"] for m in app.engine.session.messages] == ["user", "assistant"]
    # The first answer is kept, hidden, as an earlier variant.
    assert rows(data_dir, "SELECT role, hidden FROM messages ORDER BY id") == [
        ("user", 0),
        ("assistant", 1),
        ("assistant", 0),
    ]


async def test_edit_last_message_answers_again(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello")
        await pilot.press("up")  # in the empty message box: edit the last message
        await wait_for(pilot, lambda: isinstance(app.screen, TextEditScreen))
        editor = app.screen.query_one(TextArea)
        assert editor.text == "hello"
        assert editor.cursor_location == editor.document.end  # typing goes on at the end
        editor.load_text("goodbye")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, TextEditScreen))
        await wait_answer(pilot)
        user, answer = views(app)
        assert user.content == "goodbye"
        assert answer.content == default_reply("goodbye")
        assert app.engine.session.messages[0] == {"role": "user", "content": "goodbye"}
    assert rows(data_dir, "SELECT role, content FROM messages ORDER BY id") == [
        ("user", "goodbye"),
        ("assistant", default_reply("goodbye")),
    ]


async def test_new_chat_starts_empty_and_lists_both(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "first chat")
        await pilot.press("ctrl+n")
        assert app.chat is None and not views(app)
        # The engine drops the old conversation (it builds the new one on the next answer).
        await wait_for(pilot, lambda: app.engine.session is None, what="the engine to reset")
        await send(pilot, "second chat")
        assert len(app.engine.session.messages) == 2  # the new chat has no old turns
        titles = [
            str(item.query_one("Label").render()) for item in app.query_one(ChatList).children
        ]
        assert titles == ["second chat", "first chat"]
    assert sorted(rows(data_dir, "SELECT title FROM chats")) == [("first chat",), ("second chat",)]


async def test_delete_chat_removes_rows_and_text_from_file(make_app, data_dir):
    secret = "zebra-secret-4711"
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, f"remember {secret}")
        chat_id = app.chat.id
        session_file = Path(app._session_path(chat_id))
        assert session_file.exists()
        await run_command(pilot, "Delete chat")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: app.chat is None)
        await pilot.pause()
        assert not views(app)
        assert not app.query_one(ChatList).children
        assert not session_file.exists()
    assert rows(data_dir, "SELECT COUNT(*) FROM chats") == [(0,)]
    assert rows(data_dir, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert secret.encode() not in (data_dir / "chats.sqlite3").read_bytes()


async def test_delete_can_be_declined(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "keep me")
        app.action_delete_chat()
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("enter")  # focus is on Cancel
        await pilot.pause()
        assert app.chat is not None
    assert rows(data_dir, "SELECT COUNT(*) FROM messages") == [(2,)]


async def test_reopen_chat_resumes_from_saved_session(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "chat A")
        chat_a = app.chat.id
        await pilot.press("ctrl+n")
        await send(pilot, "chat B")
        await pilot.click(f"#chat-{chat_a}")
        await wait_for(pilot, lambda: app.chat is not None and app.chat.id == chat_a)
        await pilot.pause()
        assert views(app)[0].content == "chat A"
        await send(pilot, "more for A")
        session = app.engine.session
        assert session.loaded_from == app._session_path(chat_a)
        assert [m["content"] for m in session.messages if m["role"] == "user"] == [
            "chat A",
            "more for A",
        ]


async def test_reopen_after_restart_prefills_when_no_session_file(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "before restart")
        chat_id = app.chat.id
    for path in (data_dir / "sessions").iterdir():
        path.unlink()
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await pilot.click(f"#chat-{chat_id}")
        await wait_for(pilot, lambda: app.chat is not None)
        await pilot.pause()
        assert len(views(app)) == 2
        await send(pilot, "after restart")
        session = app.engine.session
        assert not hasattr(session, "loaded_from")  # rebuilt from the stored messages
        assert [m["content"] for m in session.messages if m["role"] == "user"] == [
            "before restart",
            "after restart",
        ]


async def test_settings_modal_from_palette_applies_settings(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await run_command(pilot, "Sampling settings")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        screen = app.screen
        screen.query_one("#max_tokens", Input).value = "oops"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen), "invalid input keeps the dialog open"
        assert "number" in str(screen.query_one("#settings-error").render())
        for field, value in [("temperature", "0.2"), ("top_k", "40"), ("max_tokens", "5")]:
            screen.query_one(f"#{field}", Input).value = value
        screen.query_one("#seed", Input).value = "7"
        await pilot.click("#save")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        assert app.settings.temperature == 0.2
        assert app.settings.top_k == 40 and app.settings.max_tokens == 5
        assert app.settings.seed == 7
        await send(pilot, "hello")
        answer = views(app)[-1]
        assert answer.status == "length"
        assert footer_text(answer).startswith("max tokens reached · first token")
        assert " · 5 tokens · " in footer_text(answer)
    (settings,) = rows(data_dir, "SELECT settings FROM chats")[0]
    assert '"max_tokens": 5' in settings and '"seed": 7' in settings


async def test_settings_escape_cancels(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        before = app.settings
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        app.screen.query_one("#temperature", Input).value = "1.5"
        await key(pilot, "escape")
        await pilot.pause()
        assert not isinstance(app.screen, SettingsScreen)
        assert app.settings == before


async def test_system_prompt_reaches_session(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await run_command(pilot, "System prompt")
        await wait_for(pilot, lambda: isinstance(app.screen, TextEditScreen))
        app.screen.query_one(TextArea).load_text("Answer like a pirate.")
        await pilot.press("ctrl+s")
        await send(pilot, "hello")
        assert app.engine.session.system == "Answer like a pirate."
    assert rows(data_dir, "SELECT system FROM chats") == [("Answer like a pirate.",)]


async def test_export_to_markdown(make_app, export_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello")
        footer = footer_text(views(app)[-1])
        await run_command(pilot, "Export to Markdown")
        await wait_for(pilot, lambda: app.last_export is not None)
        path = app.last_export
    assert path.parent == export_dir and path.name == "hello-1.md"
    text = path.read_text()
    assert text.startswith("# hello\n")
    assert "## You\n\nhello\n" in text
    assert "## Granite\n\n" + default_reply("hello") + "\n" in text
    assert "```python\ndef greet(name):" in text
    assert f"> {footer}\n" in text and "tok/s" in footer


async def test_load_failure_shows_error_and_keeps_history_usable(make_app, data_dir, export_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "old chat")
        chat_id = app.chat.id

    app = make_app(FakeScript(fail_load="weights are damaged"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert app.model_state == "failed"
        banner = str(app.query_one("#banner-text").render())
        assert "weights are damaged" in banner and "can still be read" in banner
        # Sending is refused without adding anything.
        await send(pilot, "new message", wait=False)
        await pilot.pause()
        assert not views(app)
        # Browse, export, delete.
        await pilot.click(f"#chat-{chat_id}")
        await wait_for(pilot, lambda: len(views(app)) == 2, what="old chat shown")
        app.action_export()
        assert app.last_export is not None and "old chat" in app.last_export.read_text()
        app.action_delete_chat()
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: app.chat is None)
    assert rows(data_dir, "SELECT COUNT(*) FROM messages") == [(0,)]


async def test_corrupt_database_is_moved_aside(make_app, data_dir):
    data_dir.mkdir(parents=True)
    junk = b"this is not a database " * 100
    (data_dir / "chats.sqlite3").write_bytes(junk)
    app = make_app()
    notices = []
    async with app.run_test(size=SIZE) as pilot:
        notices = [n.message for n in app._notifications]
        await wait_ready(pilot)
        await send(pilot, "fresh start")
    moved = list(data_dir.glob("chats.sqlite3.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == junk
    assert any("moved to" in n and moved[0].name in n for n in notices)
    assert rows(data_dir, "SELECT content FROM messages WHERE role='user'") == [("fresh start",)]


async def test_error_mid_generation_shows_in_message_and_app_goes_on(make_app, data_dir):
    script = FakeScript(fail_after_chunks=3)
    app = make_app(script)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "first")
        answer = views(app)[-1]
        assert answer.status == "error" and answer.has_class("-error")
        assert "failed on purpose" in footer_text(answer)
        assert answer.content == default_reply("first")[:18]  # the 3 chunks before it
        script.fail_after_chunks = None
        await send(pilot, "second")
        assert views(app)[-1].status == "done"
        # The failed turn is not part of what the model sees.
        assert [m["content"] for m in app.engine.session.messages if m["role"] == "user"] == [
            "second"
        ]
        # Regenerating a failed turn asks again.
        script.fail_after_chunks = 1
        await send(pilot, "third")
        assert views(app)[-1].status == "error"
        script.fail_after_chunks = None
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: views(app)[-1].status == "done", what="retried answer")
        assert views(app)[-1].content == default_reply("third")
    statuses = rows(data_dir, "SELECT role, status FROM messages ORDER BY id")
    assert statuses == [
        ("user", "done"),
        ("assistant", "error"),
        ("user", "done"),
        ("assistant", "done"),
        ("user", "done"),
        ("assistant", "done"),
    ]


async def test_quit_during_generation_keeps_question_and_partial_answer(make_app, data_dir):
    app = make_app(FakeScript(delay=0.01))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await stream_some(pilot, 30, "long story please")
        await key(pilot, "ctrl+q")
    engine = app.engine
    assert not engine.is_alive()
    stored = rows(data_dir, "SELECT role, content, status FROM messages ORDER BY id")
    assert stored[0] == ("user", "long story please", "done")
    role, content, status = stored[1]
    assert role == "assistant" and status == "stopped"
    assert len(content) > 30 and default_reply("long story please").startswith(content)


async def test_tool_calls_show_as_collapsible_blocks(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "what is the weather")
        (block,) = views(app)[-1].query(ToolCallBlock)
        assert block.title == "tool call: get_weather" and block.collapsed
        block.collapsed = False
        await pilot.pause()
        assert '"city": "Paris"' in str(block.query_one(".tool-args").render())
        chat_id = app.chat.id
        await pilot.press("ctrl+n")
        await pilot.click(f"#chat-{chat_id}")
        await wait_for(pilot, lambda: len(views(app)) == 2)
        await pilot.pause()
        (block,) = views(app)[-1].query(ToolCallBlock)  # kept in the database too
        assert block.call.arguments == {"city": "Paris"}


async def test_copy_message_and_code_block(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello")
        answer = views(app)[-1]
        answer.focus()
        await pilot.press("enter")
        assert app.clipboard == answer.content
        await pilot.press("ctrl+k")
        assert app.clipboard == 'def greet(name):\n    return f"Hello, {name}!"'
        app.copy_to_clipboard("")
        await pilot.click(answer.query_one(MarkdownFence))
        assert app.clipboard.startswith("def greet(name):")


async def test_scroll_stays_pinned_until_user_scrolls_up(make_app):
    paragraphs = "\n\n".join(f"Paragraph {i}." for i in range(400))
    app = make_app(FakeScript(reply=lambda _: paragraphs, delay=0.01, chunk_chars=20))
    async with app.run_test(size=(80, 20)) as pilot:
        await wait_ready(pilot)
        await send(pilot, "long please", wait=False)
        conversation = app.conversation
        answer = views(app)[-1]
        await wait_for(pilot, lambda: conversation.max_scroll_y > 30, what="overflow")
        await asyncio.sleep(0.1)
        assert conversation.scroll_y >= conversation.max_scroll_y - 1
        conversation.scroll_to(y=0, animate=False)  # as a user scrolling up does
        seen = len(answer.content)
        await wait_for(pilot, lambda: len(answer.content) > seen + 100, what="more text")
        await asyncio.sleep(0.1)
        assert conversation.scroll_y < 5
        await key(pilot, "escape")
        await wait_answer(pilot)


async def test_sending_while_answering_is_refused(make_app, data_dir):
    app = make_app(FakeScript(delay=0.01))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "long please", wait=False)
        app.prompt.load_text("impatient")
        await pilot.press("enter")
        assert app.prompt.text == "impatient"  # kept for later
        await key(pilot, "escape")
        await wait_answer(pilot)
    assert rows(data_dir, "SELECT COUNT(*) FROM messages WHERE role='user'") == [(1,)]


async def test_hub_unreachable_says_how_to_pass_a_folder(
    data_dir, export_dir, monkeypatch, tmp_path
):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    app = GraniteChatApp(
        "ibm-granite/granite-4.0-h-350m", data_dir=data_dir, export_dir=export_dir
    )  # the real engine: it fails before touching MLX
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert app.model_state == "failed"
        banner = str(app.query_one("#banner-text").render())
        assert "cannot be reached" in banner and "not in the local cache" in banner
        assert "granite-mlx chat --model /path/to/folder" in banner


async def test_download_progress_is_shown_while_loading(data_dir, export_dir):
    release = threading.Event()

    class DownloadingEngine(FakeEngine):
        def load_model(self, model):
            for done in (0, 40e6, 80e6):
                self._emit(LoadProgress("Downloading", done, 80e6))
            release.wait(5)
            return super().load_model(model)

    app = GraniteChatApp(
        "fake/granite",
        engine_factory=lambda emit: DownloadingEngine(emit),
        data_dir=data_dir,
        export_dir=export_dir,
    )
    async with app.run_test(size=SIZE) as pilot:
        bar = app.query_one("#banner-progress", ProgressBar)
        await wait_for(pilot, lambda: bar.progress == 80e6, what="progress")
        assert bar.display and bar.total == 80e6
        banner = str(app.query_one("#banner-text").render())
        assert "Downloading fake/granite: 80.0 MB of 80.0 MB · " in banner
        assert "B/s" in banner  # the download speed
        release.set()
        await wait_ready(pilot)
        assert not app.query_one("#banner").display
