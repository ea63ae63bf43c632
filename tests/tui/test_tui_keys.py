"""The keyboard model: typing is never lost, the message box is home (issue 11)."""

from __future__ import annotations

from granite_mlx.tui.fake_engine import FakeScript, default_reply
from granite_mlx.tui.screens import KEYS_HELP, KeysScreen, TextEditScreen
from granite_mlx.tui.widgets import ChatList, Conversation, MessageView
from textual import events
from textual.widgets import Static, TextArea
from tui_pilot_helpers import key, rows, send, stream_some, views, wait_answer, wait_for, wait_ready

SIZE = (100, 32)


async def test_choosing_a_chat_in_the_sidebar_focuses_the_input_and_typing_is_sent(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "first chat")
        first = app.chat.id
        await pilot.press("ctrl+n")
        await send(pilot, "second chat")
        chat_list = app.query_one(ChatList)
        chat_list.focus()
        await pilot.pause()
        # The list is newest first: Down moves to the first chat, Enter opens it.
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: app.chat is not None and app.chat.id == first)
        await pilot.pause()
        assert app.focused is app.prompt
        # The open chat is marked in the list.
        assert chat_list.query_one(f"#chat-{first}").has_class("-open")
        assert not any(item.has_class("-open") for item in chat_list.children if item.id != f"chat-{first}")
        await pilot.press("h", "i")
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(views(app)) == 4, what="the sent message")
        await wait_answer(pilot)
        assert views(app)[2].content == "hi"
        assert views(app)[3].content == default_reply("hi")


async def test_letters_typed_on_a_focused_message_or_the_list_go_to_the_input(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello")
        answer = views(app)[-1]
        answer.focus()
        await pilot.pause()
        await pilot.press("w", "h", "y", "space", "n", "o", "t", "question_mark")
        assert app.prompt.text == "why not?"
        assert app.focused is app.prompt
        app.query_one(ChatList).focus()
        await pilot.pause()
        await pilot.press("x")
        assert app.prompt.text == "why not?x" and app.focused is app.prompt


async def test_escape_returns_to_the_input_and_still_stops_an_answer(make_app, data_dir):
    app = make_app(FakeScript(delay=0.01))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello")
        views(app)[-1].focus()
        await pilot.pause()
        await key(pilot, "escape")
        await pilot.pause()
        assert app.focused is app.prompt
        app.query_one(ChatList).focus()
        answer = await stream_some(pilot)
        answer.focus()
        await key(pilot, "escape")
        await wait_answer(pilot)
        assert answer.status == "stopped" and app.focused is app.prompt


async def test_messages_are_one_tab_stop_and_reachable_for_copy(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        for text in ("one", "two", "three"):
            await send(pilot, text)
        chain = app.screen.focus_chain
        assert not any(isinstance(w, MessageView) for w in chain), "no Tab stop per message"
        assert [type(w) for w in chain].count(Conversation) == 1
        # Shift+Tab from the box reaches the conversation, which hands focus to the
        # last message on screen; Up/Down walk the messages; Enter copies one.
        await pilot.press("shift+tab")
        await pilot.pause()
        assert app.focused is views(app)[-1]
        await pilot.press("up", "up")
        assert app.focused is views(app)[-3]  # the answer to "two"
        await pilot.press("enter")
        assert app.clipboard == default_reply("two")
        # Down past the last message, or Tab, returns to the box.
        await pilot.press("down", "down", "down")
        assert app.focused is app.prompt
        await pilot.press("shift+tab")
        await pilot.pause()
        await pilot.press("tab")
        assert app.focused is app.prompt


async def test_ctrl_c_stops_an_answer_and_when_idle_quits_on_the_second_press(make_app, data_dir):
    app = make_app(FakeScript(delay=0.01))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        answer = await stream_some(pilot)
        await key(pilot, "ctrl+c")
        await wait_answer(pilot)
        assert answer.status == "stopped"
        assert app.is_running, "stopping an answer does not quit"
        # Ctrl+C with text selected in the box copies it, as in any editor.
        app.prompt.load_text("keep this")
        app.prompt.select_all()
        await key(pilot, "ctrl+c")
        assert app.clipboard == "keep this" and app.is_running
        app.prompt.move_cursor((0, 0))
        # Idle: the first press asks, the second quits.
        await key(pilot, "ctrl+c")
        await pilot.pause()
        assert app.is_running
        assert any("Ctrl+C again" in n.message for n in app._notifications)
        await key(pilot, "ctrl+c")
        await wait_for(pilot, lambda: not app.is_running, what="the app to quit")
    assert rows(data_dir, "SELECT status FROM messages WHERE role='assistant'") == [("stopped",)]
    # What was typed in the box is kept for the next start.
    assert rows(data_dir, "SELECT value FROM app_settings WHERE key='draft'") == [('"keep this"',)]


async def test_draft_left_in_the_box_comes_back_at_the_next_start(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        app.prompt.load_text("half a thought")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert app.prompt.text == "half a thought"


async def test_user_line_breaks_are_kept_on_screen(make_app, export_dir):
    text = "first line\nsecond line\n\n- not a list\n  indented"
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, text)
        user = views(app)[0]
        body = user.query_one(".body", Static)
        lines = body.render_lines(body.region.reset_offset)
        pad = body.styles.padding.left
        rendered = [strip.text[pad:].rstrip() for strip in lines]
        assert rendered[: len(text.splitlines())] == text.splitlines()
        app.action_export()
        assert text in app.last_export.read_text()


async def test_up_in_an_empty_box_edits_the_last_message_and_not_otherwise(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello")
        app.prompt.load_text("draft\nline two")
        app.prompt.move_cursor((1, 0))
        await pilot.press("up")
        assert not isinstance(app.screen, TextEditScreen), "Up moves the cursor in a draft"
        assert app.prompt.cursor_location == (0, 0)
        app.prompt.clear()
        await pilot.press("up")
        await wait_for(pilot, lambda: isinstance(app.screen, TextEditScreen))
        editor = app.screen.query_one(TextArea)
        assert editor.text == "hello" and editor.cursor_location == (0, 5)


async def test_keys_help_lists_the_apps_own_keys(make_app):
    from tui_pilot_helpers import run_command

    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await run_command(pilot, "Keys")
        await wait_for(pilot, lambda: isinstance(app.screen, KeysScreen))
        # The app's bindings are in the help, and no Ctrl+arrow (macOS takes those).
        for binding in ("Ctrl+R", "Ctrl+N", "Ctrl+F", "Ctrl+S", "Ctrl+B", "Ctrl+J", "Esc"):
            assert f"| {binding}" in KEYS_HELP
        assert "Ctrl+Up" not in KEYS_HELP
        assert not any("up" in b.key and "ctrl" in b.key for b in app.BINDINGS)
        await pilot.press("escape")
        assert not isinstance(app.screen, KeysScreen)


async def test_keys_typed_ahead_land_where_the_earlier_keys_moved_the_focus(make_app):
    """Tab, Down, Enter and letters in one burst (a fast typist, a terminal delivering
    several keys at once): each goes where the keys before it moved the focus."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "first chat")
        first = app.chat.id
        await pilot.press("ctrl+n")
        await send(pilot, "second chat")
        driver = app._driver
        burst = ["tab", "down", "enter", *"ahead", "enter"]
        for name in burst:  # no pause between them
            driver.send_message(events.Key(name, name if len(name) == 1 else ("\r" if name == "enter" else None)))
        await wait_for(pilot, lambda: app.chat.id == first and len(views(app)) == 4, what="sent")
        await wait_answer(pilot)
        assert views(app)[2].content == "ahead"
