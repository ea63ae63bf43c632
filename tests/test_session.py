"""ChatSession: each turn prefills only new tokens; regenerate, edit, cancel, save and
load all answer exactly as a fresh run over the same conversation would.

The model is the real-vocabulary hybrid (Mamba2 + attention, so snapshots are
needed) or its all-attention variant (which trims instead), with the real
tokenizer and chat template. Where a test needs to know the answer's tokens it
forces them with a logits processor.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from test_generate import EOS, force, real_vocab, tiny

from granite_mlx import ChatSession, stream_generate
from granite_mlx.chat_format import encode_prompt
from granite_mlx.engine import MIN_SNAPSHOT_GAP
from granite_mlx.session import SessionError

ANSWER = "Paris is the capital of France."


def tokens_of(responses) -> list[int]:
    return [r.token for r in responses]


def conversation_ids(tokenizer, session, messages=None) -> list[int]:
    history = ([{"role": "system", "content": session.system}] if session.system else []) + (
        session.messages if messages is None else messages
    )
    return encode_prompt(tokenizer, history, tools=session.tools)


def forced_answer(tokenizer, text=ANSWER, eos=True) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) + ([EOS] if eos else [])


@pytest.fixture(params=[False, True], ids=["hybrid", "dense"])
def chat(request):
    model, tokenizer = real_vocab(dense=request.param)
    return model, tokenizer


def test_each_turn_prefills_only_new_tokens(chat):
    model, tokenizer = chat
    s = ChatSession(model, tokenizer, system="Be brief.")
    answer = forced_answer(tokenizer)
    r1 = list(s.send("What is the capital of France?", logits_processors=[force(answer)]))
    assert "".join(r.text for r in r1) == ANSWER and r1[-1].finish_reason == "stop"
    turn1 = conversation_ids(tokenizer, s, s.messages[:1])
    assert s.last_prefill_tokens == len(turn1)
    assert s.messages == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": ANSWER},
    ]

    # The EOS was sampled, so its model call was queued: the cache holds it too.
    r2 = list(s.send("And of Italy?", max_tokens=6))
    turn2 = conversation_ids(tokenizer, s, s.messages[:3])
    assert s.last_prefill_tokens == len(turn2) - len(turn1) - len(answer)
    # Exactly what a fresh run over the whole conversation gives.
    history = [{"role": "system", "content": "Be brief."}, *s.messages[:3]]
    assert tokens_of(r2) == tokens_of(stream_generate(model, tokenizer, history, max_tokens=6))


def test_an_answer_cut_at_max_tokens_reuses_all_but_its_last_token(chat):
    model, tokenizer = chat
    s = ChatSession(model, tokenizer)
    answer = forced_answer(tokenizer, eos=False)
    r1 = list(
        s.send("Capital of France?", max_tokens=len(answer), logits_processors=[force(answer)])
    )
    assert r1[-1].finish_reason == "length"
    turn1 = conversation_ids(tokenizer, s, s.messages[:1])
    list(s.send("Thanks!", max_tokens=2))
    turn2 = conversation_ids(tokenizer, s, s.messages[:3])
    # The last answer token was never fed; the rendered turn continues with it.
    assert s.last_prefill_tokens == len(turn2) - len(turn1) - (len(answer) - 1)


def test_regenerate_and_edit_restore_a_snapshot_and_equal_a_fresh_run(chat):
    model, tokenizer = chat
    s = ChatSession(model, tokenizer)
    list(s.send("Capital of France?", logits_processors=[force(forced_answer(tokenizer))]))
    sampling = {"temperature": 1.0, "seed": 3, "max_tokens": 6}
    first = tokens_of(s.send("And of Italy?", **sampling))

    again = tokens_of(s.regenerate(**sampling))
    assert again == first  # same seed, same state
    assert s.last_prefill_tokens == 0  # the logits after the prompt were recorded
    assert len(s.messages) == 4
    fresh = ChatSession.from_messages(model, tokenizer, s.messages[:3])
    assert tokens_of(fresh.regenerate(**sampling)) == first
    assert fresh.last_prefill_tokens == len(conversation_ids(tokenizer, s, s.messages[:3]))

    edited = tokens_of(s.edit_last("And of Spain?", max_tokens=6))
    assert [m["content"] for m in s.messages[:3]] == [
        "Capital of France?", ANSWER, "And of Spain?",
    ]  # fmt: skip
    assert len(s.messages) == 4
    full = len(conversation_ids(tokenizer, s, s.messages[:3]))
    assert s.last_prefill_tokens < full - 20  # the first turn came from the cache
    fresh = ChatSession.from_messages(model, tokenizer, s.messages[:3])
    assert tokens_of(fresh.regenerate(max_tokens=6)) == edited


def test_cancelled_answer_is_kept_and_the_next_turn_continues():
    model, tokenizer = real_vocab()
    s = ChatSession(model, tokenizer)
    cancel = threading.Event()
    responses = []
    for r in s.send("Tell me a story.", max_tokens=40, cancel=cancel):
        responses.append(r)
        if len(responses) == 3:
            cancel.set()
    assert responses[-1].finish_reason == "cancelled"
    partial = "".join(r.text for r in responses)
    assert s.messages[-1] == {"role": "assistant", "content": partial}
    # Closing the stream early keeps the partial answer too.
    stream = s.send("Go on.", max_tokens=40)
    next(stream), next(stream)
    stream.close()
    assert s.messages[-1]["role"] == "assistant" and len(s.messages) == 4
    nxt = tokens_of(s.send("Shorter, please.", max_tokens=4))
    assert nxt == tokens_of(stream_generate(model, tokenizer, s.messages[:5], max_tokens=4))


def test_save_load_continue_equals_an_uninterrupted_session(tmp_path):
    model, tokenizer = real_vocab()
    s = ChatSession(model, tokenizer, system="You are terse.")
    list(s.send("Capital of France?", logits_processors=[force(forced_answer(tokenizer))]))
    list(s.send("And of Italy?", max_tokens=5))
    path = tmp_path / "chat.safetensors"
    s.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["chat.safetensors"]  # no temp files left

    resumed = ChatSession.load(path, model, tokenizer)
    assert resumed.messages == s.messages and resumed.system == s.system
    a = tokens_of(s.send("And of Spain?", max_tokens=5))
    b = tokens_of(resumed.send("And of Spain?", max_tokens=5))
    assert a == b and resumed.last_prefill_tokens == s.last_prefill_tokens
    assert resumed.last_prefill_tokens < 20  # the saved cache was used
    # The saved snapshots work too: regenerating needs no prefill...
    assert tokens_of(resumed.regenerate(max_tokens=5)) == a
    assert resumed.last_prefill_tokens == 0
    # ... and editing the last question prefills only that question (and the few tokens
    # between the previous answer's kept end and the question: see MIN_SNAPSHOT_GAP).
    again = ChatSession.load(path, model, tokenizer)
    edited = tokens_of(again.edit_last("And of Portugal?", max_tokens=3))
    question = len(tokenizer.encode("And of Portugal?", add_special_tokens=False))
    assert again.last_prefill_tokens <= question + 8 + MIN_SNAPSHOT_GAP - 1
    fresh = ChatSession.from_messages(model, tokenizer, again.messages[:-1], system=s.system)
    assert tokens_of(fresh.regenerate(max_tokens=3)) == edited


def test_load_refuses_other_models_and_other_files(tmp_path):
    model, tokenizer = real_vocab()
    s = ChatSession(model, tokenizer)
    list(s.send("Hi", max_tokens=2))
    s.save(tmp_path / "chat.safetensors")
    other, _ = tiny("hybrid_nope")
    with pytest.raises(SessionError, match="different model"):
        ChatSession.load(tmp_path / "chat.safetensors", other, tokenizer)
    from granite_mlx.cache import save_cache

    save_cache(tmp_path / "cache.safetensors", model.make_cache())
    with pytest.raises(SessionError, match="not a saved chat session"):
        ChatSession.load(tmp_path / "cache.safetensors", model, tokenizer)


def test_tool_call_answers_are_kept_as_tool_calls():
    model, tokenizer = real_vocab()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    s = ChatSession(model, tokenizer, tools=tools)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Boston"}}\n</tool_call>'
    responses = list(
        s.send("Weather in Boston?", logits_processors=[force(forced_answer(tokenizer, call))])
    )
    assert [c.name for c in responses[-1].tool_calls] == ["get_weather"]
    answer = s.messages[-1]
    assert answer["content"] == ""
    (entry,) = answer["tool_calls"]
    assert entry["function"]["name"] == "get_weather"
    assert json.loads(entry["function"]["arguments"]) == {"city": "Boston"}
    # Hand the result back and let the model answer it.
    s.messages.append({"role": "tool", "content": '{"temperature": 21}'})
    assert list(s.regenerate(max_tokens=3))[-1].finish_reason == "length"
    assert [m["role"] for m in s.messages] == ["user", "assistant", "tool", "assistant"]


def test_from_messages_set_system_and_errors():
    model, tokenizer = real_vocab()
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    s = ChatSession.from_messages(model, tokenizer, history)
    assert s.system == "Be brief." and len(s.messages) == 2
    with pytest.raises(SessionError, match="nothing to regenerate"):
        list(ChatSession(model, tokenizer).regenerate())
    with pytest.raises(SessionError, match="no user message"):
        list(ChatSession(model, tokenizer).edit_last("x"))
    with pytest.raises(TypeError, match="cache"):
        list(s.send("x", cache=None))
    assert len(s.messages) == 2  # a refused turn leaves the conversation as it was

    list(s.send("How are you?", max_tokens=2))
    s.set_system("Be verbose.")  # the prefix changed: everything is prefilled again
    list(s.send("Really?", max_tokens=2))
    assert s.last_prefill_tokens == len(conversation_ids(tokenizer, s, s.messages[:-1]))


# --------------------------------------------------------------------------
# Session files that do not match: refused, never reused wrongly
# --------------------------------------------------------------------------


def saved_session(tmp_path, name="chat.granite"):
    model, tokenizer = real_vocab()
    s = ChatSession(model, tokenizer, system="Be brief.")
    list(s.send("Capital of France?", max_tokens=3))
    list(s.send("And of Italy?", max_tokens=3))
    path = tmp_path / name
    s.save(path)
    return s, path


def test_sessions_save_and_load_under_any_name_and_leave_no_partial_file(tmp_path):
    s, path = saved_session(tmp_path, "chat.granite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.granite"]
    assert (path.stat().st_mode & 0o777) == 0o600  # a conversation is the user's alone
    resumed = ChatSession.load(path, s.model, s.tokenizer)
    assert resumed.messages == s.messages and resumed.context_tokens == s.context_tokens
    # A failed save (a message that is not JSON) leaves nothing behind.
    s.messages.append({"role": "user", "content": object()})
    with pytest.raises(SessionError, match="not JSON"):
        s.save(tmp_path / "other.granite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.granite"]
    s.messages.pop()


def test_a_save_that_fails_while_writing_keeps_the_earlier_file(tmp_path, monkeypatch):
    import granite_mlx.cache

    s, path = saved_session(tmp_path, "chat.granite")
    before = path.read_bytes()
    list(s.send("One more?", max_tokens=2))

    def disk_full(name, arrays, metadata=None):  # half a file, then the error MLX raises
        Path(name).write_bytes(b"\0" * 1000)
        raise RuntimeError("[save_safetensors] Failed to write: No space left on device")

    monkeypatch.setattr(granite_mlx.cache.mx, "save_safetensors", disk_full)
    with pytest.raises(SessionError, match="No space left on device. Nothing was written"):
        s.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.granite"]
    assert path.read_bytes() == before


def rewrite(path, edit):
    """Load a saved session's arrays and metadata, let `edit` change them, write back."""
    import mlx.core as mx

    arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    inner = json.loads(meta["metadata"])
    edit(arrays, inner, meta)
    meta["metadata"] = json.dumps(inner)
    tmp = path.with_name("x.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=meta)
    tmp.replace(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda a, m, meta: m.update(ids=m["ids"][:-3]), "damaged"),  # ids shorter than the cache
        (lambda a, m, meta: m.pop("ids"), "damaged"),  # a missing key
        (lambda a, m, meta: m.update(ids=[10**7] + m["ids"][1:]), "vocabulary"),
        (lambda a, m, meta: m.update(snapshots=[10**6]), "snapshot"),
        (lambda a, m, meta: m.update(messages="hi"), "damaged"),
        (lambda a, m, meta: meta.update(kinds=json.dumps(["attention", "mamba"] * 2 + ["mamba"]
                                                         * (len(json.loads(meta["kinds"])) - 4)))
         , "damaged"),  # kinds swapped
        (lambda a, m, meta: a.update({"layers.0.ssm_state": a["layers.0.ssm_state"][:, :2]}),
         "shape"),
        (lambda a, m, meta: meta.update(kinds="not json"), "damaged"),
    ],
)
def test_damaged_session_files_are_refused(tmp_path, edit, match):
    s, path = saved_session(tmp_path)
    rewrite(path, edit)
    with pytest.raises(SessionError, match=match):
        ChatSession.load(path, s.model, s.tokenizer)


def test_a_session_of_other_weights_of_the_same_shape_is_refused(tmp_path):
    import mlx.core as mx

    from granite_mlx import load

    s, path = saved_session(tmp_path)
    from test_generate import real_vocab_folder

    tuned, tokenizer = load(real_vocab_folder(), dtype="float32")  # the same checkpoint...
    assert ChatSession.load(path, tuned, tokenizer).messages == s.messages
    w = tuned.model.layers[0].mamba.out_proj.weight
    tuned.model.layers[0].mamba.out_proj.weight = w + 1e-3 * mx.ones_like(w)  # ... fine-tuned
    with pytest.raises(SessionError, match="different model"):
        ChatSession.load(path, tuned, tokenizer)
    (tmp_path / "junk.granite").write_bytes(b"not a session at all")
    with pytest.raises(SessionError):
        ChatSession.load(tmp_path / "junk.granite", s.model, s.tokenizer)
