"""SVG snapshots of the chat's look (pytest-textual-snapshot).

Deterministic by construction: a fixed terminal size, the fake engine's fixed stats,
no clock in the header, and cursors that do not blink. Regenerate after an intended
change with ``pytest tests/tui/test_tui_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

from granite_mlx.tui.fake_engine import FakeScript
from granite_mlx.tui.screens import KeysScreen, SettingsScreen
from granite_mlx.tui.store import ChatStore
from tui_pilot_helpers import run_command, send, stop_blinking, wait_for, wait_ready

SIZE = (100, 34)

STATS = {
    "prompt_tokens": 12,
    "prompt_tps": 480.5,
    "generation_tokens": 42,
    "generation_tps": 61.25,
    "peak_memory": 0.71,
}


def test_chat_with_code_block(make_app, snap_compare):
    async def run_before(pilot) -> None:
        await wait_ready(pilot)
        await send(pilot, "Show me a greeting function")
        stop_blinking(pilot.app)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_answer_footers_done_stopped_and_error(make_app, data_dir, snap_compare):
    store = ChatStore(data_dir / "chats.sqlite3")
    chat = store.create_chat("Footers")
    store.add_message(chat.id, "user", "What is MLX?")
    done = store.add_message(chat.id, "assistant", "An array framework for Apple silicon.")
    store.update_message(done.id, stats=STATS, tool_calls=[{"name": "search", "arguments": {}}])
    store.add_message(chat.id, "user", "Tell me more")
    stopped = store.add_message(chat.id, "assistant", "It has lazy", status="stopped")
    store.update_message(stopped.id, stats={**STATS, "generation_tokens": 3})
    store.add_message(chat.id, "user", "And then?")
    failed = store.add_message(chat.id, "assistant", "", status="error")
    store.update_message(failed.id, error="RuntimeError: out of memory")
    store.close()

    async def run_before(pilot) -> None:
        await wait_ready(pilot)
        await pilot.app.open_chat(chat.id)
        await wait_for(pilot, lambda: pilot.app.chat is not None)
        await pilot.pause()
        stop_blinking(pilot.app)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_settings_screen(make_app, snap_compare):
    async def run_before(pilot) -> None:
        await wait_ready(pilot)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, SettingsScreen))
        await pilot.pause()
        stop_blinking(pilot.app)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_system_prompt_documents_context_and_variants(make_app, data_dir, tmp_path, snap_compare):
    notes = tmp_path / "notes.md"
    notes.write_text("# Launch\nTuesday at noon.")
    replies = iter(["It is on Tuesday.", "Tuesday, at noon."])

    async def run_before(pilot) -> None:
        app = pilot.app
        await wait_ready(pilot)
        await run_command(pilot, "System prompt")
        app.screen.query_one("#editor").load_text("Answer in one line.")
        await pilot.press("ctrl+s")
        app.prompt.load_text(f"/attach {notes}")
        await pilot.press("enter")
        await send(pilot, "When is the launch?\nAnd where?")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: "noon" in app.conversation.children[-1].content)
        await wait_for(pilot, lambda: app.turn is None)
        app.clear_notifications()
        await pilot.pause()
        stop_blinking(app)

    app = make_app(FakeScript(reply=lambda text: next(replies)))
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_narrow_window(make_app, snap_compare):
    async def run_before(pilot) -> None:
        await wait_ready(pilot)
        await send(pilot, "Does the text wrap at words in a narrow window like this one?")
        stop_blinking(pilot.app)

    assert snap_compare(make_app(), terminal_size=(40, 30), run_before=run_before)


def test_keys_help(make_app, snap_compare):
    async def run_before(pilot) -> None:
        await wait_ready(pilot)
        pilot.app.action_keys()
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, KeysScreen))
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)
