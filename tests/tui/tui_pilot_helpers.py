"""Small helpers for driving the chat app with Textual's Pilot.

Pilot's own ``press`` and ``pause`` wait until the process is idle, which never happens
while the fake model streams; so while an answer streams these helpers send keys the way
a terminal does (through the driver) and poll with plain asyncio sleeps.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from granite_mlx.tui.app import GraniteChatApp
from granite_mlx.tui.protocol import SamplingSettings
from granite_mlx.tui.widgets import MessageView
from textual import events
from textual.command import CommandInput, CommandList, CommandPalette
from textual.pilot import Pilot
from textual.widgets import Input, TextArea

KEY_NAMES = {" ": "space", "\n": "ctrl+j", "?": "question_mark", ".": "full_stop"}


async def wait_for(
    pilot: Pilot, predicate: Callable[[], bool], timeout: float = 10.0, what: str = ""
) -> None:
    """Let the app run until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


async def wait_ready(pilot: Pilot) -> None:
    app = pilot.app
    assert isinstance(app, GraniteChatApp)
    await wait_for(pilot, lambda: app.model_state != "loading", what="the model to load")


KEY_CHARACTERS = {"enter": "\r", "escape": "\x1b"}


async def key(pilot: Pilot, name: str) -> None:
    """Send one key as terminal input would, without waiting for the app to go idle."""
    driver = pilot.app._driver
    assert driver is not None
    character = KEY_CHARACTERS.get(name, name if len(name) == 1 else None)
    driver.send_message(events.Key(name, character))
    await asyncio.sleep(0.02)


async def type_text(pilot: Pilot, text: str) -> None:
    await pilot.press(*(KEY_NAMES.get(ch, ch) for ch in text))


async def send(pilot: Pilot, text: str, wait: bool = True, typed: bool = False) -> None:
    """Put a message in the prompt (typed key by key if asked), press Enter, and (by
    default) wait for the whole answer. Typing is slow in Pilot, so most tests paste."""
    app = pilot.app
    assert isinstance(app, GraniteChatApp)
    app.prompt.focus()
    before = len(views(app))
    if typed:
        await type_text(pilot, text)
    else:
        app.prompt.load_text(text)
    await key(pilot, "enter")
    if app.model_state == "failed":
        return  # refused; the caller checks that
    await wait_for(pilot, lambda: len(views(app)) >= before + 2, what="the answer to start")
    if wait:
        await wait_answer(pilot)


async def stream_some(pilot: Pilot, chars: int = 20, text: str = "a long one please"):
    """Send ``text`` and return the answer's view once ``chars`` of it streamed."""
    await send(pilot, text, wait=False)
    answer = views(pilot.app)[-1]
    await wait_for(pilot, lambda: len(answer.content) > chars, what="some streamed text")
    return answer


async def wait_answer(pilot: Pilot, timeout: float = 10.0) -> None:
    app = pilot.app
    assert isinstance(app, GraniteChatApp)
    await wait_for(
        pilot,
        lambda: app.turn is None and views(app)[-1].status != "streaming",
        timeout,
        what="the answer to finish",
    )
    await pilot.pause()  # let the layout settle (e.g. the refreshed chat list) before clicks


def views(app: GraniteChatApp) -> list[MessageView]:
    return list(app.conversation.query(MessageView))


def footer_text(view: MessageView) -> str:
    footers = view.query(".footer")  # none until the view is composed
    return str(footers.first().render()) if footers else ""


def stop_blinking(app: GraniteChatApp) -> None:
    """Cursors blink on a timer; a snapshot must not depend on when it is taken."""
    for widget in app.screen.query("TextArea, Input"):
        if isinstance(widget, (TextArea, Input)):
            widget.cursor_blink = False


def rows(data_dir: Path, sql: str, *args: object) -> list[tuple]:
    """Rows of the app's database, read as another program would."""
    with sqlite3.connect(data_dir / "chats.sqlite3") as conn:
        return conn.execute(sql, args).fetchall()


@dataclass
class StreamingKeyDelays:
    delays: list[float]  # seconds, one per key press
    answer_chars: int  # the answer's length when the measurement began
    tokens_per_second: float  # the streaming rate during it


async def key_delays_while_streaming(pilot: Pilot, presses: int = 40) -> StreamingKeyDelays:
    """Stream a long answer and time key presses into the box once it is long.

    The app needs a scripted engine that streams fast (e.g. FakeScript(delay=0.0005,
    chunk_chars=4)). Measured on a long document: a UI that re-renders the whole
    answer per token gets slower as the answer grows.
    """
    app = pilot.app
    assert isinstance(app, GraniteChatApp)
    await wait_ready(pilot)
    app.settings = SamplingSettings(max_tokens=1_000_000)
    await send(pilot, "long answer please", wait=False)
    answer = views(app)[-1]
    await wait_for(pilot, lambda: len(answer.content) > 3000, 60, what="a long answer")
    before, started = len(answer.content), time.perf_counter()
    delays: list[float] = []
    await worst_key_delay(pilot, presses=presses, delays=delays)
    rate = (len(answer.content) - before) / (time.perf_counter() - started) / 4
    assert app.turn is not None, "the answer was still streaming during the measurement"
    await key(pilot, "escape")
    await wait_answer(pilot)
    return StreamingKeyDelays(delays, before, rate)


async def worst_key_delay(
    pilot: Pilot, presses: int = 40, gap: float = 0.01, delays: list[float] | None = None
) -> float:
    """Press keys into the prompt the way a terminal does and return the worst delay.

    Each key goes through the driver like real input; the delay is the time until the
    prompt's text shows it, so it includes whatever the app was busy with (rendering
    the streaming answer, database writes) when the key arrived.
    """
    app = pilot.app
    assert isinstance(app, GraniteChatApp)
    prompt = app.prompt
    prompt.focus()
    await asyncio.sleep(0.05)
    driver = app._driver
    assert driver is not None
    worst = 0.0
    for n in range(presses):
        before = len(prompt.text)
        key = "abcdefghijklmnopqrstuvwxyz"[n % 26]
        started = time.perf_counter()
        driver.send_message(events.Key(key, key))
        deadline = started + 5.0
        while len(prompt.text) == before:
            if time.perf_counter() > deadline:
                raise AssertionError("a key press was not handled within 5 s")
            await asyncio.sleep(0.0005)
        delay = time.perf_counter() - started
        worst = max(worst, delay)
        if delays is not None:
            delays.append(delay)
        await asyncio.sleep(gap)
    return worst


async def run_command(pilot, title: str) -> None:
    """Pick a command from the command palette by typing its title."""
    await pilot.press("ctrl+p")
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, CommandPalette), what="palette")
    pilot.app.screen.query_one(CommandInput).value = title  # as if typed, without the wait
    command_list = pilot.app.screen.query_one(CommandList)

    def found() -> bool:
        index = command_list.highlighted
        if command_list.option_count == 0 or index is None:
            return False
        return title.lower() in str(command_list.get_option_at_index(index).prompt).lower()

    await wait_for(pilot, found, what=f"palette hit {title!r}")
    await pilot.press("enter")
    await pilot.pause()
