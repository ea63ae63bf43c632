"""The real engine (granite_mlx.load + ChatSession) end to end, on a tiny checkpoint.

Skipped until the generation layer (granite_mlx.session) can be imported. The
checkpoint comes from the ``checkpoint_path`` fixture in conftest.py; when it has no
tokenizer, the committed Granite tokenizer (tests/fixtures/tokenizer) is added in a
temporary copy.
"""

from __future__ import annotations

import json
import queue
import shutil
import sys
from pathlib import Path

import pytest
from granite_mlx.tui.app import GraniteChatApp
from granite_mlx.tui.engine import RealEngine
from granite_mlx.tui.protocol import (
    Cancel,
    Done,
    Error,
    Event,
    Load,
    Loaded,
    LoadFailed,
    LoadProgress,
    OpenChat,
    PromptProgress,
    SamplingSettings,
    Send,
    Shutdown,
    Token,
)
from tui_pilot_helpers import footer_text, send, views, wait_for

pytest.importorskip("granite_mlx.session", reason="the generation layer is not there yet")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # checkpoint_factory, the project's test helper
TOKENIZER = REPO / "tests" / "fixtures" / "tokenizer"
REAL_VOCAB = 100352
SHORT = SamplingSettings(temperature=0.0, max_tokens=8, seed=0)
LONG = SamplingSettings(temperature=0.0, max_tokens=400, seed=0)


@pytest.fixture(scope="module")
def model_dir(checkpoint_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder ``granite_mlx.load`` can open: the checkpoint plus a tokenizer.

    The committed tiny checkpoints have a 512-token vocabulary, too small for the
    Granite tokenizer's ids; for those, the project's checkpoint factory writes the
    same kind of tiny model with the real vocabulary instead.
    """
    if not (checkpoint_path / "config.json").exists():
        pytest.skip(f"no checkpoint at {checkpoint_path}")
    if (checkpoint_path / "tokenizer.json").exists():
        return checkpoint_path
    folder = tmp_path_factory.mktemp("model")
    config = json.loads((checkpoint_path / "config.json").read_text())
    if config.get("vocab_size", 0) >= REAL_VOCAB:
        shutil.copytree(checkpoint_path, folder, dirs_exist_ok=True)
    else:
        factory = pytest.importorskip("checkpoint_factory")
        factory.write_checkpoint(folder, factory.config_for("real_vocab"), seed=0)
    for f in TOKENIZER.iterdir():
        if not (folder / f.name).exists():
            shutil.copy(f, folder / f.name)
    return folder


class Events:
    def __init__(self) -> None:
        self.queue: queue.Queue[Event] = queue.Queue()

    def __call__(self, event: Event) -> None:
        self.queue.put(event)

    def until(self, kind: type, timeout: float = 60.0) -> list[Event]:
        seen = []
        while True:
            seen.append(self.queue.get(timeout=timeout))
            if isinstance(seen[-1], (kind, LoadFailed, Error)):
                return seen


@pytest.fixture
def engine(model_dir: Path):
    events = Events()
    engine = RealEngine(events)
    engine.start()
    engine.submit(Load(str(model_dir)))
    loaded = events.until(Loaded)[-1]
    assert isinstance(loaded, Loaded), getattr(loaded, "message", loaded)
    yield engine, events
    engine.submit(Shutdown())
    engine.join(timeout=30)
    assert not engine.is_alive()


def test_real_engine_answers_with_stats(engine):
    engine, events = engine
    engine.submit(Send(1, "Hello!", SHORT))
    seen = events.until(Done)
    done = seen[-1]
    assert done.finish_reason in ("stop", "length")
    assert done.stats is not None and done.stats.generation_tokens > 0
    assert done.stats.prompt_tokens > 0 and done.stats.peak_memory >= 0
    text = "".join(e.text for e in seen if isinstance(e, Token))
    assert engine._session.messages[-1] == {"role": "assistant", "content": text}


def test_real_engine_cancel_keeps_partial_answer(engine):
    engine, events = engine
    engine.submit(Send(1, "Tell me a long story.", LONG))
    first = events.until(Token)
    engine.submit(Cancel())
    seen = first + events.until(Done)
    assert seen[-1].finish_reason in ("cancelled", "stop")  # a tiny model may stop first
    text = "".join(e.text for e in seen if isinstance(e, Token))
    assert engine._session.messages[-1]["content"] == text


def test_real_engine_resumes_from_saved_session(engine, tmp_path: Path):
    engine, events = engine
    path = str(tmp_path / "chat-1.safetensors")
    engine.submit(OpenChat((), None, path))
    engine.submit(Send(1, "Hi there.", SHORT))
    events.until(Done)
    assert Path(path).exists()
    history = tuple(engine._session.messages)

    engine.submit(OpenChat(history, None, path))  # from the file: only the new turn
    engine.submit(Send(2, "And again.", SHORT))
    events.until(Done)
    resumed = engine._session.last_prefill_tokens

    Path(path).unlink()
    engine.submit(OpenChat(history, None, path))  # no file: the whole history
    engine.submit(Send(3, "And again.", SHORT))
    events.until(Done)
    assert resumed < engine._session.last_prefill_tokens


async def test_app_with_real_engine(model_dir: Path, data_dir: Path, export_dir: Path):
    app = GraniteChatApp(str(model_dir), data_dir=data_dir, export_dir=export_dir)
    async with app.run_test(size=(100, 32)) as pilot:
        await wait_for(pilot, lambda: app.model_state != "loading", 120, "the model")
        assert app.model_state == "ready", app.model_error
        app.settings = SHORT
        await send(pilot, "Hello!")
        answer = views(app)[-1]
        assert answer.status in ("done", "length")
        assert "tok/s" in footer_text(answer)
    assert not app.engine.is_alive()


def test_real_engine_reports_progress_cache_reuse_and_context(engine, model_dir: Path):
    engine, events = engine
    engine.submit(Send(1, "Hello there, how are you today?", SHORT))
    seen = events.until(Done)
    progress = [e for e in seen if isinstance(e, PromptProgress)]
    assert progress and progress[-1].processed == progress[-1].total > 0
    first_token = next(i for i, e in enumerate(seen) if isinstance(e, Token))
    assert seen.index(progress[-1]) < first_token  # the prompt is read, then answered
    first = seen[-1].stats
    assert first.ttft is not None and first.ttft > 0
    assert first.cached_tokens == 0 and first.context_tokens > first.prompt_tokens
    engine.submit(Send(2, "And again?", SHORT))
    second = events.until(Done)[-1].stats
    # The second turn reads only its new tokens; the rest came from the session's cache.
    assert second.cached_tokens > 0
    assert second.prompt_tokens + second.cached_tokens > first.context_tokens - 5
    assert second.context_tokens > first.context_tokens


def test_real_engine_passes_documents_to_the_session(engine):
    engine, events = engine
    engine.submit(Send(1, "When is the launch?", SHORT))
    without = events.until(Done)[-1].stats.context_tokens
    document = {"title": "notes", "text": "The launch is on Tuesday at noon, in hall B."}
    engine.submit(OpenChat((), None, None, (document,)))
    engine.submit(Send(2, "When is the launch?", SHORT))
    done = events.until(Done)[-1]
    assert isinstance(done, Done), getattr(done, "message", done)
    assert engine._session.documents == [document]
    # The document is in the prompt: the conversation holds its tokens too.
    assert done.stats.context_tokens > without + 10


def test_real_engine_reports_the_context_limit(model_dir: Path):
    events = Events()
    engine = RealEngine(events)
    engine.start()
    engine.submit(Load(str(model_dir)))
    seen = events.until(Loaded)
    engine.submit(Shutdown())
    engine.join(timeout=30)
    config = json.loads((model_dir / "config.json").read_text())
    assert seen[-1].context_limit == config["max_position_embeddings"]
    steps = [e for e in seen if isinstance(e, LoadProgress) and e.unit == "step"]
    assert [(e.completed, e.total) for e in steps] == [(0, 2), (1, 2), (2, 2)]


@pytest.mark.parametrize("drafting", ["prompt_lookup", "draft_model"])
def test_chat_with_speculative_decoding_answers_as_without(model_dir: Path, drafting: str):
    """`granite-mlx chat --prompt-lookup K` / `--draft-model M`: the same greedy answer."""
    answers = []
    for options in ({}, {"prompt_lookup": 3} if drafting == "prompt_lookup" else
                    {"draft_model": str(model_dir), "num_draft_tokens": 3}):  # fmt: skip
        events = Events()
        engine = RealEngine(events)
        engine.drafting = dict(options)
        engine.start()
        try:
            engine.submit(Load(str(model_dir)))
            assert isinstance(events.until(Loaded)[-1], Loaded)
            engine.submit(Send(1, "Hello! Hello! Hello!", SHORT))
            seen = events.until(Done)
            assert isinstance(seen[-1], Done), seen[-1]
            answers.append("".join(e.text for e in seen if isinstance(e, Token)))
        finally:
            engine.submit(Shutdown())
            engine.join(timeout=30)
    assert answers[0] == answers[1] and answers[0]


def test_chat_drafting_flags_are_checked_before_anything_loads(tmp_path: Path):
    from granite_mlx.tui.app import main

    assert main(["--prompt-lookup", "0", "--draft-model", "x", "--data-dir", str(tmp_path),
                 "--num-draft-tokens", "0"]) == 1  # fmt: skip
    assert main(["--draft-model", "x", "--prompt-lookup", "2", "--data-dir", str(tmp_path)]) == 1
