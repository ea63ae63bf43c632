"""Issue 11's features, through Pilot on the scripted engine: progress, stats and the
context meter, answer variants, rename and search, documents, model switching,
per-chat settings with defaults, the session cache, and small windows."""

from __future__ import annotations

import itertools
import json
import threading

import huggingface_hub.constants as hf_constants
from fake_hf_cache import add_repo
from granite_mlx.tui.app import GraniteChatApp, build_parser, main
from granite_mlx.tui.fake_engine import FakeEngine, FakeScript, default_reply
from granite_mlx.tui.protocol import LoadProgress, SamplingSettings
from granite_mlx.tui.screens import PickScreen, SettingsScreen
from granite_mlx.tui.session_cache import DEFAULT_MAX_MB
from granite_mlx.tui.widgets import ChatList, SystemPromptView
from textual.widgets import Footer, Input, ProgressBar, Static
from tui_pilot_helpers import (
    footer_text,
    key,
    rows,
    run_command,
    send,
    views,
    wait_answer,
    wait_for,
    wait_ready,
)

SIZE = (100, 32)


def numbered_replies():
    """Each answer different: 'answer 1 to ...', 'answer 2 to ...'."""
    counter = itertools.count(1)
    return lambda text: f"answer {next(counter)} to {text}"


# --- show what is happening -------------------------------------------------------------


async def test_prompt_progress_live_rate_and_final_stats(make_app):
    script = FakeScript(prefill_delay=0.02, delay=0.02)
    app = make_app(script)
    long_question = "tell me\n" + "about it " * 380  # 856 fake tokens: 14 prefill chunks
    total = len(f"user:{long_question}\n") // 4
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, long_question, wait=False)
        answer = views(app)[-1]
        seen_footers: set[str] = set()
        titles: set[str] = set()

        def watch() -> bool:
            if answer.status == "streaming":
                seen_footers.add(footer_text(answer))
                titles.add(app.sub_title)
            return answer.status != "streaming"

        await wait_for(pilot, watch, what="the answer")
        await wait_answer(pilot)
        assert app.sub_title == "fake/granite"  # and no longer once it has ended
        final = footer_text(answer)
        chunks = -(-len(answer.content) // 6)
    progress = sorted(f for f in seen_footers if f.startswith("reading prompt "))
    assert len(progress) >= 3, seen_footers  # the counter moved while the prompt was read
    assert f"reading prompt {total}/{total}" in progress
    assert any(f.endswith(" tok/s") and " tokens · " in f for f in seen_footers), seen_footers
    # The title says so for the whole answer, prefill included.
    assert titles == {"fake/granite · answering (Esc stops)"}
    assert final == (
        f"first token 0.25 s · prompt {total} tokens (0 cached) · "
        f"{chunks} tokens · 64.0 tok/s · peak 0.75 GB"
    )


async def test_second_turn_reports_tokens_reused_from_the_cache(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello there")
        await send(pilot, "and more")
        footer = footer_text(views(app)[-1])
        first = default_reply("hello there")
        # Everything up to the new question came from the cache.
        cached = len(f"user:hello there\nassistant:{first}\n") // 4
        assert f"({cached} cached)" in footer and cached > 20


async def test_time_to_first_token_is_measured_by_the_engine(make_app):
    app = make_app(FakeScript(ttft=None, prefill_delay=0.05, delay=0.0))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "x" * 400)  # two prefill chunks of 50 ms
        ttft = views(app)[-1].stats.ttft
        assert 0.1 <= ttft < 2.0


async def test_context_meter_warns_before_the_limit(make_app):
    app = make_app(FakeScript(context_limit=1000, delay=0, reply=lambda text: "ok"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        meter = app.query_one("#context", Static)
        await send(pilot, "short")
        text = str(meter.render())
        assert text == f"context {app.context_tokens} / 1,000 tokens ({app.context_tokens / 1000:.0%})"
        assert not meter.has_class("-warning")
        await send(pilot, "word " * 660)  # past 80% of 1000 tokens
        assert 0.8 <= app.context_tokens / 1000 < 1
        text = str(meter.render())
        assert meter.has_class("-warning") and "nearly full" in text
        assert any("Context nearly full" == (n.title or "") for n in app._notifications)
        await send(pilot, "word " * 200)
        assert meter.has_class("-full") and "cannot take more" in str(meter.render())


async def test_system_prompt_is_shown_at_the_top(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await run_command(pilot, "System prompt")
        app.screen.query_one("#editor").load_text("Answer like a pirate.")
        await pilot.press("ctrl+s")
        await pilot.pause()
        (shown,) = app.conversation.query(SystemPromptView)
        assert "Answer like a pirate." in str(shown.render())
        await send(pilot, "hello")
        assert app.conversation.children[0] is shown
        chat_id = app.chat.id
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert not app.conversation.query(SystemPromptView)
        await app.open_chat(chat_id)
        await pilot.pause()
        assert isinstance(app.conversation.children[0], SystemPromptView)


async def test_loading_shows_steps_with_a_bar(data_dir, export_dir):
    release = threading.Event()

    class SlowLoading(FakeEngine):
        def load_model(self, model):
            self._emit(LoadProgress("Reading the weights", 0, 2, "step"))
            self._emit(LoadProgress("Reading the tokenizer", 1, 2, "step"))
            release.wait(5)
            return super().load_model(model)

    app = GraniteChatApp(
        "fake/granite", engine_factory=SlowLoading, data_dir=data_dir, export_dir=export_dir
    )
    async with app.run_test(size=SIZE) as pilot:
        bar = app.query_one("#banner-progress", ProgressBar)
        await wait_for(pilot, lambda: bar.progress == 1, what="the load step")
        assert bar.display and bar.total == 2
        banner = str(app.query_one("#banner-text").render())
        assert banner.startswith("Loading fake/granite: reading the tokenizer (1/2) · ")
        assert banner.endswith(" s")  # and for how long
        release.set()
        await wait_ready(pilot)
        assert not app.query_one("#banner").display


# --- history: variants, rename, search ----------------------------------------------------


async def test_regenerate_keeps_earlier_answers_as_variants(make_app, data_dir):
    app = make_app(FakeScript(reply=numbered_replies()))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hi")
        for n in (2, 3):
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda n=n: views(app)[-1].content == f"answer {n} to hi")
            await wait_answer(pilot)
        answer = views(app)[-1]
        assert answer.content == "answer 3 to hi" and answer.variant == (3, 3)
        assert "3/3" in str(answer.query_one(".variants").render())
        answer.focus()
        await pilot.press("left")
        await wait_for(pilot, lambda: views(app)[-1].content == "answer 2 to hi")
        assert views(app)[-1].variant == (2, 3) and len(views(app)) == 2
        await pilot.pause()
        # The model continues from the answer on screen.
        assert app.engine.session.messages[-1]["content"] == "answer 2 to hi"
        await send(pilot, "go on")
        assert app.engine.session.messages[1]["content"] == "answer 2 to hi"
        chat_id = app.chat.id
        await pilot.press("ctrl+n")
        await app.open_chat(chat_id)
        await pilot.pause()
        assert [v.variant for v in views(app)] == [None, (2, 3), None, None]
    assert rows(data_dir, "SELECT content, hidden FROM messages WHERE role='assistant' ORDER BY id") == [
        ("answer 1 to hi", 1),
        ("answer 2 to hi", 0),
        ("answer 3 to hi", 1),
        ("answer 4 to go on", 0),
    ]


async def test_rename_chat(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello")
        await run_command(pilot, "Rename chat")
        field = app.screen.query_one("#line", Input)
        assert field.value == "hello"
        field.value = "Greetings"
        await pilot.press("enter")
        await pilot.pause()
        titles = [str(i.query_one("Label").render()) for i in app.query_one(ChatList).children]
        assert titles == ["Greetings"] and app.chat.title == "Greetings"
    assert rows(data_dir, "SELECT title FROM chats") == [("Greetings",)]


async def test_search_finds_a_chat_by_message_text_and_opens_it(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "tell me about aardvarks")
        aardvarks = app.chat.id
        await pilot.press("ctrl+n")
        await send(pilot, "and now zebras")
        await pilot.press("ctrl+f")
        await wait_for(pilot, lambda: isinstance(app.screen, PickScreen))
        app.screen.query_one("#query", Input).value = "aardv"
        await wait_for(pilot, lambda: len(app.screen.values) == 1, what="one hit")
        label = str(app.screen.query_one("#choices").get_option_at_index(0).prompt)
        assert "[aardvarks]" in label  # the match, in context
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat is not None and app.chat.id == aardvarks)
        await pilot.pause()
        assert app.focused is app.prompt
        assert app.store.search_mode == "fts5"


# --- documents -------------------------------------------------------------------------


async def test_attach_a_document_with_the_line_command(make_app, data_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("The launch is on Tuesday.")
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        app.prompt.load_text(f"/attach {notes}")
        await key(pilot, "enter")
        await pilot.pause()
        bar = app.query_one("#documents", Static)
        assert bar.display and "notes.txt (25 B)" in str(bar.render())
        assert app.prompt.text == ""
        await send(pilot, "when is the launch?")
        assert views(app)[-1].content.startswith("I read 1 document(s): notes.txt.")
        assert app.engine.session.documents == [
            {"title": "notes.txt", "text": "The launch is on Tuesday."}
        ]
        chat_id = app.chat.id
        # A file that is not there: a message, and the line stays for fixing.
        app.prompt.load_text("/attach /no/such/file.txt")
        await key(pilot, "enter")
        await pilot.pause()
        assert app.prompt.text == "/attach /no/such/file.txt"
        assert any("There is no file at /no/such/file.txt" in n.message for n in app._notifications)
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert not app.query_one("#documents").display
        await app.open_chat(chat_id)
        await pilot.pause()
        assert "notes.txt" in str(app.query_one("#documents").render())
        await run_command(pilot, "Detach document")
        await pilot.press("enter")
        await pilot.pause()
        assert not app.query_one("#documents").display
        await send(pilot, "and now?")
        assert not app.engine.session.documents
    assert rows(data_dir, "SELECT COUNT(*) FROM documents") == [(0,)]


# --- models ------------------------------------------------------------------------------


async def test_switch_model_from_the_palette(make_app, data_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    add_repo(
        cache,
        "ibm-granite/granite-4.0-h-1b",
        {
            "config.json": json.dumps({"model_type": "granitemoehybrid", "torch_dtype": "bfloat16"}).encode(),
            "model.safetensors": b"w" * 3_000_000,
        },
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 1_500_000)
    loaded: list[str] = []

    class Recording(FakeEngine):
        def load_model(self, model):
            loaded.append(model)
            return super().load_model(model)

    app = make_app()
    app.engine_factory = lambda emit: Recording(emit, FakeScript())
    app.store.remember_model(str(folder))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello")
        await run_command(pilot, "Switch model")
        await wait_for(pilot, lambda: isinstance(app.screen, PickScreen))
        picker = app.screen
        labels = [str(picker.query_one("#choices").get_option_at_index(i).prompt) for i in range(2)]
        assert labels[0] == f"{folder}  (local folder, 1.5 MB)"
        assert labels[1] == "ibm-granite/granite-4.0-h-1b  (Hugging Face cache, 3.0 MB, bfloat16)"
        picker.query_one("#query", Input).value = "h-1b"
        await wait_for(pilot, lambda: len(picker.values) == 1)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.model_state == "ready" and len(loaded) == 2)
        assert loaded == ["fake/granite", "ibm-granite/granite-4.0-h-1b"]
        assert app.sub_title == "ibm-granite/granite-4.0-h-1b"
        # The chat goes on with the new model (its history is prefilled again).
        await send(pilot, "still there?")
        assert [m["content"] for m in app.engine.session.messages if m["role"] == "user"] == [
            "hello",
            "still there?",
        ]
    assert rows(data_dir, "SELECT model FROM chats") == [("ibm-granite/granite-4.0-h-1b",)]


async def test_a_local_model_folder_is_remembered(data_dir, export_dir, tmp_path):
    folder = tmp_path / "granite-local"
    folder.mkdir()
    app = GraniteChatApp(
        str(folder), engine_factory=lambda emit: FakeEngine(emit), data_dir=data_dir, export_dir=export_dir
    )
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
    assert rows(data_dir, "SELECT name FROM models") == [(str(folder),)]


# --- settings ------------------------------------------------------------------------------


async def test_sampling_settings_per_chat_with_app_wide_defaults(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "chat one")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        labels = [str(label.render()) for label in app.screen.query("#settings-grid > Label")]
        assert labels[0] == "Temperature (default 0.7; 0 = greedy)"
        assert "Repetition penalty (default off; empty = off)" in labels
        app.screen.query_one("#min_p", Input).value = "0.05"
        app.screen.query_one("#repetition_penalty", Input).value = "1.1"
        await pilot.press("ctrl+s")  # this chat only
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        await send(pilot, "more")
        options = app.engine.session.last_options
        assert options["min_p"] == 0.05 and options["repetition_penalty"] == 1.1
        await pilot.press("ctrl+n")
        assert app.settings == SamplingSettings()  # a new chat starts from the defaults
        await send(pilot, "chat two")
        assert "repetition_penalty" not in app.engine.session.last_options
        # Save as default: new chats (and later runs) start from it.
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        app.screen.query_one("#temperature", Input).value = "0.2"
        await pilot.click("#default")
        await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen))
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert app.defaults.temperature == 0.2 and app.settings.temperature == 0.2
        chats = {c.title: c for c in app.store.list_chats()}
        assert chats["chat one"].settings["min_p"] == 0.05
        assert chats["chat one"].settings["temperature"] == 0.7


async def test_settings_validation_message_names_the_field_and_is_fully_visible(make_app):
    app = make_app()
    async with app.run_test(size=(80, 30)) as pilot:
        await wait_ready(pilot)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
        screen = app.screen
        for field, value, message in [
            ("max_tokens", "ten", "Max tokens must be a whole number; “ten” is not."),
            ("max_tokens", "0", "Max tokens must be a whole number, 1 or more."),
            ("repetition_penalty", "nan", "Repetition penalty must be above 0 and at most 10"),
            ("seed", "-1", "Seed must be a whole number from 0 to 2^63 - 1 (empty = random)."),
        ]:
            screen.query_one("#max_tokens", Input).value = "1024"
            screen.query_one("#repetition_penalty", Input).value = ""
            screen.query_one("#seed", Input).value = ""
            screen.query_one(f"#{field}", Input).value = value
            await pilot.press("ctrl+s")
            await pilot.pause()
            error = screen.query_one("#settings-error", Static)
            lines = [s.text.strip() for s in error.render_lines(error.region.reset_offset)]
            assert message in " ".join(line for line in lines if line)
            assert screen.query_one("#settings").region.contains_region(error.region)
            assert isinstance(app.screen, SettingsScreen)


# --- session cache --------------------------------------------------------------------------


async def test_session_cache_is_capped_least_recently_used_first(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        ids = []
        for text in ("first", "second", "third"):
            await pilot.press("ctrl+n")
            await send(pilot, text)
            ids.append(app.chat.id)
        files = app.session_cache.files()
        assert sorted(files) == ids
        # Reopen the first chat and answer there: it becomes the most recently used.
        await app.open_chat(ids[0])
        await pilot.pause()
        await send(pilot, "again")
        sizes = {i: p.stat().st_size for i, p in app.session_cache.files().items()}
        # A cap that holds two of the three files: the least recently used one goes.
        app.session_cache.max_bytes = sizes[ids[0]] + sizes[ids[2]]
        assert app.session_cache.enforce_cap() == [ids[1]]
        assert sorted(app.session_cache.files()) == [ids[0], ids[2]]
        assert rows(data_dir, "SELECT chat_id FROM session_files ORDER BY chat_id") == [
            (ids[0],),
            (ids[2],),
        ]
        # The cap is enforced after every save (even on the file just written).
        app.session_cache.max_bytes = 1
        await send(pilot, "once more")
        assert app.session_cache.files() == {}


async def test_session_cache_mb_sets_the_cap_for_this_run_only(make_app):
    app = make_app(session_cache_mb=3)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert app.session_cache.max_bytes == 3_000_000
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert app.session_cache.max_bytes == DEFAULT_MAX_MB * 1_000_000


async def test_session_cache_can_be_turned_off_and_cleared(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "cached")
        assert app.session_cache.files()
        await run_command(pilot, "Clear session cache")
        assert not app.session_cache.files()
        await run_command(pilot, "Session cache: turn off")
        await send(pilot, "not cached")
        assert not app.session_cache.files()
    app = make_app()  # the choice is kept
    assert not app.session_cache.enabled
    # --no-session-cache turns it off for one run, whatever is saved.
    app.store.set_setting("session_cache", True)
    app.store.close()
    args = build_parser().parse_args(["--no-session-cache", "--data-dir", str(data_dir)])
    assert args.no_session_cache
    app = make_app(session_cache=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "still not cached")
        assert not (data_dir / "sessions").exists() or not app.session_cache.files()


async def test_session_file_of_another_model_is_not_reused(make_app, data_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        await send(pilot, "hello")
        chat_id = app.chat.id
        path = app.session_cache.path(chat_id)
        assert path.exists()
        app.switch_model("other/model")
        await wait_ready(pilot)
        await pilot.pause()
        assert not path.exists()  # written with fake/granite: deleted, not fed to another model
        await send(pilot, "again")
        assert not hasattr(app.engine.session, "loaded_from")
        assert rows(data_dir, "SELECT model FROM session_files") == [("other/model",)]


# --- small windows ----------------------------------------------------------------------------


async def test_narrow_window_collapses_the_sidebar_and_wraps_at_words(make_app):
    text = "Wrapping should happen between words and never inside extraordinarily big words"
    app = make_app()
    async with app.run_test(size=(40, 30)) as pilot:
        await wait_ready(pilot)
        assert not app.query_one(ChatList).display
        # Textual's footer would squeeze six keys into 40 columns: one plain line instead.
        assert not app.query_one(Footer).display
        keyline = app.query_one("#keyline", Static)
        assert keyline.display and str(keyline.render()) == "^p commands · ^n new · ^f search"
        await send(pilot, text)
        body = views(app)[0].query_one(".body", Static)
        lines = [s.text.strip() for s in body.render_lines(body.region.reset_offset)]
        lines = [line for line in lines if line]
        assert len(lines) > 2 and " ".join(lines) == text  # breaks only at spaces
        assert min(len(line) for line in lines[:-1]) > 10  # not a character per line
        # Ctrl+B shows the list anyway; choosing a chat gives the room back to it.
        await pilot.press("ctrl+b")
        await pilot.pause()
        chat_list = app.query_one(ChatList)
        assert chat_list.display and chat_list.size.width < 40
        chat_list.focus()
        await pilot.press("enter")
        await pilot.pause()
        assert not chat_list.display and app.focused is app.prompt
    app = make_app()
    async with app.run_test(size=(70, 30)) as pilot:  # narrow, but room for the footer
        await wait_ready(pilot)
        assert not app.query_one(ChatList).display and app.query_one(Footer).compact
        assert app.query_one(Footer).display and not app.query_one("#keyline").display
    app = make_app()
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_ready(pilot)
        assert app.query_one(ChatList).display and not app.query_one(Footer).compact


# --- the command line ----------------------------------------------------------------------


async def test_system_temperature_and_max_tokens_from_the_command_line(data_dir, export_dir):
    from granite_mlx.tui.app import app_from_args

    args = build_parser().parse_args(
        ["--system", "Be brief.", "--temperature", "0", "--max-tokens", "3", "--data-dir", str(data_dir)]
    )
    app = app_from_args(args, engine_factory=lambda emit: FakeEngine(emit, FakeScript()))
    async with app.run_test(size=SIZE) as pilot:
        await wait_ready(pilot)
        assert isinstance(app.conversation.children[0], SystemPromptView)
        await send(pilot, "hello")
        session = app.engine.session
        assert session.system == "Be brief."
        assert session.last_options["temperature"] == 0.0 and views(app)[-1].status == "length"
        await pilot.press("ctrl+n")  # every new chat of this run
        await send(pilot, "again")
        assert app.engine.session.system == "Be brief."
    # This run's values are not saved as the defaults.
    app = GraniteChatApp("fake", engine_factory=lambda emit: FakeEngine(emit), data_dir=data_dir)
    assert app.defaults == SamplingSettings()


def test_help_states_the_defaults(capsys):
    try:
        main(["--help"])
    except SystemExit:
        pass
    help_text = " ".join(capsys.readouterr().out.split())
    assert "0.7 until you change it" in help_text and "1024 until you change it" in help_text
    assert "(default: 2048 MB)" in help_text and "--no-session-cache" in help_text
