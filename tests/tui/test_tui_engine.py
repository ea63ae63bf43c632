"""The engine thread and its protocol, driven directly (no UI), with the fake session."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest
from granite_mlx.tui.engine import ModelUnavailable, resolve_model
from granite_mlx.tui.fake_engine import FakeEngine, FakeScript, default_reply
from granite_mlx.tui.protocol import (
    Cancel,
    Done,
    Error,
    Event,
    Load,
    Loaded,
    LoadFailed,
    OpenChat,
    Regenerate,
    SamplingSettings,
    Send,
    Shutdown,
    Token,
)

LONG = SamplingSettings(max_tokens=100_000)


class Recorder:
    """Collects events from the engine thread."""

    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()

    def __call__(self, event: Event) -> None:
        self.events.put(event)

    def until(self, kind: type, timeout: float = 5.0) -> list[Event]:
        """Events up to and including the first of ``kind``."""
        seen = []
        while True:
            event = self.events.get(timeout=timeout)
            seen.append(event)
            if isinstance(event, kind):
                return seen


@pytest.fixture
def engine_with():
    engines = []

    def start(script: FakeScript | None = None, load: bool = True):
        recorder = Recorder()
        engine = FakeEngine(recorder, script or FakeScript(delay=0))
        engine.start()
        engines.append(engine)
        if load:
            engine.submit(Load("fake"))
            recorder.until(Loaded)
        return engine, recorder

    yield start
    for engine in engines:
        engine.submit(Shutdown())
        engine.join(timeout=5)
        assert not engine.is_alive()


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Token))


def test_answer_streams_tokens_then_done_with_stats(engine_with):
    engine, rec = engine_with()
    engine.submit(Send(1, "hi"))
    events = rec.until(Done)
    done = events[-1]
    assert text_of(events) == default_reply("hi")
    assert done.request_id == 1 and done.finish_reason == "stop"
    assert done.stats.generation_tps == 64.0 and done.stats.generation_tokens > 0
    # Tokens are batched: far fewer events than tokens when the model is fast.
    assert len(events) - 1 < done.stats.generation_tokens
    assert engine.session.messages[-1]["content"] == default_reply("hi")


def test_cancel_stops_a_running_answer_and_keeps_the_partial(engine_with):
    engine, rec = engine_with(FakeScript(delay=0.005))
    engine.submit(Send(1, "long please", LONG))
    first = rec.until(Token)
    engine.submit(Cancel())
    events = first + rec.until(Done)
    assert events[-1].finish_reason == "cancelled"
    partial = text_of(events)
    assert partial and default_reply("long please").startswith(partial)
    assert len(partial) < len(default_reply("long please"))
    assert engine.session.messages[-1] == {"role": "assistant", "content": partial}


def test_cancel_before_the_engine_starts_the_answer(engine_with):
    engine, rec = engine_with(FakeScript(load_delay=0.2, delay=0), load=False)
    engine.submit(Load("fake"))
    engine.submit(Send(1, "hi"))
    engine.submit(Cancel())  # arrives while the model still loads
    events = rec.until(Done)
    assert events[-1].finish_reason == "cancelled" and not text_of(events)


def test_error_mid_answer_is_reported_and_the_engine_goes_on(engine_with):
    script = FakeScript(delay=0, fail_after_chunks=2)
    engine, rec = engine_with(script)
    engine.submit(Send(1, "hi"))
    events = rec.until(Error)
    assert events[-1].request_id == 1 and "failed on purpose" in events[-1].message
    assert text_of(events) == default_reply("hi")[:12]
    script.fail_after_chunks = None
    engine.submit(OpenChat())
    engine.submit(Send(2, "again"))
    assert rec.until(Done)[-1].finish_reason == "stop"


def test_load_failure_then_requests_get_errors(engine_with):
    engine, rec = engine_with(FakeScript(fail_load="no weights here"), load=False)
    engine.submit(Load("fake"))
    (failed,) = rec.until(LoadFailed)
    assert "no weights here" in failed.message
    engine.submit(Send(1, "hi"))
    error = rec.until(Error)[-1]
    assert error.request_id == 1 and "no weights here" in error.message


def test_regenerate_and_max_tokens(engine_with):
    engine, rec = engine_with()
    engine.submit(Send(1, "hi"))
    rec.until(Done)
    engine.submit(Regenerate(2, SamplingSettings(max_tokens=3)))
    events = rec.until(Done)
    assert events[-1].finish_reason == "length" and events[-1].stats.generation_tokens == 3
    assert [m["role"] for m in engine.session.messages] == ["user", "assistant"]


def test_saved_session_is_used_only_when_it_matches_the_history(engine_with, tmp_path: Path):
    engine, rec = engine_with()
    path = str(tmp_path / "chat-1.safetensors")
    engine.submit(OpenChat((), None, path))
    engine.submit(Send(1, "hi"))
    rec.until(Done)
    assert Path(path).exists()
    history = tuple(engine.session.messages)

    engine.submit(OpenChat(history, None, path))
    engine.submit(Send(2, "more"))
    rec.until(Done)
    assert engine.session.loaded_from == path

    # A history that differs from the file (e.g. the app stopped mid-answer): prefill.
    engine.submit(OpenChat(history[:1] + ({"role": "assistant", "content": "x"},), None, path))
    engine.submit(Send(3, "other"))
    rec.until(Done)
    assert not hasattr(engine.session, "loaded_from")
    assert engine.session.messages[1]["content"] == "x"


def test_shutdown_ends_the_thread_during_an_answer(engine_with):
    engine, rec = engine_with(FakeScript(delay=0.01))
    engine.submit(Send(1, "long please", LONG))
    rec.until(Token)
    engine.submit(Shutdown())
    engine.join(timeout=2)
    assert not engine.is_alive()


def test_all_model_calls_run_on_the_one_engine_thread(tmp_path: Path):
    """MLX streams are per thread: loading, prefilling and every step must share one."""
    threads: list[tuple[str, int]] = []

    class RecordingEngine(FakeEngine):
        def load_model(self, model):
            threads.append(("load", threading.get_ident()))
            loaded, tokenizer, session_class = super().load_model(model)

            class Recording(session_class):
                @classmethod
                def from_messages(cls, *args, **kwargs):
                    threads.append(("from_messages", threading.get_ident()))
                    return super().from_messages(*args, **kwargs)

                def _answer(self, *args, **kwargs):
                    for response in super()._answer(*args, **kwargs):
                        threads.append(("step", threading.get_ident()))
                        yield response

                def save(self, path):
                    threads.append(("save", threading.get_ident()))
                    super().save(path)

            return loaded, tokenizer, Recording

    rec = Recorder()
    engine = RecordingEngine(rec, FakeScript(delay=0))
    engine.start()
    engine.submit(Load("fake"))
    engine.submit(OpenChat((), None, str(tmp_path / "s.safetensors")))
    engine.submit(Send(1, "hi"))
    rec.until(Done)
    engine.submit(Regenerate(2))
    rec.until(Done)
    engine.submit(Shutdown())
    engine.join(timeout=5)
    names = {name for name, _ in threads}
    assert {"load", "from_messages", "step", "save"} <= names
    assert {ident for _, ident in threads} == {engine.ident}
    assert engine.ident != threading.get_ident()


def test_resolve_model_local_folder_and_missing_path(tmp_path: Path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ModelUnavailable, match="--model /path/to/folder"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(ModelUnavailable, match="must be a folder"):
        resolve_model(str(tmp_path / "file.bin"))


def test_resolve_model_offline_and_not_cached_explains_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable) as raised:
        resolve_model("ibm-granite/granite-4.0-h-350m")
    message = str(raised.value)
    assert "cannot be reached" in message and "not in the local cache" in message
    assert "granite-mlx chat --model /path/to/folder" in message


def test_download_progress_bar_reports_bytes_written():
    from granite_mlx.tui.engine import _progress_bar_class

    reports = []
    bar_class = _progress_bar_class(lambda *args: reports.append(args))
    written = bar_class(desc="Reconstructing", total=100, unit="B", name="hf")
    network = bar_class(desc="Downloading bytes", total=100, unit="B")
    files = bar_class(desc="Fetching 3 files", total=3)
    written.update(40)
    network.update(70)  # the parallel network counter: not shown
    files.update(1)  # file counts are not bytes
    written.update(60)
    assert reports == [("Reconstructing", 40, 100), ("Reconstructing", 100, 100)]
