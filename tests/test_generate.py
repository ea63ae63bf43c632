"""stream_generate / generate: greedy tokens equal transformers', and the text
pipeline (stop strings, UTF-8, tool calls), cancellation, seeds, long prompts.

The models are the committed tiny checkpoints (vocabulary 512) and the
``real_vocab`` model (the real Granite vocabulary and tokenizer), whose weights
are written at test time. Helpers here are shared with the other generation tests.
"""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import tempfile
import threading
from functools import cache
from pathlib import Path

import mlx.core as mx
import pytest
from checkpoint_factory import write_checkpoint
from conftest import FIXTURES, REFERENCE, checkpoint

from granite_mlx import GenerationResponse, generate, load, stream_generate
from granite_mlx.cache import cache_length
from granite_mlx.generate import (
    GenerationError,
    PromptTooLongError,
    TextAssembler,
    encode_input,
)

REF = json.loads((REFERENCE / "generation.json").read_text())
TOKENIZER = FIXTURES / "tokenizer"
EOS = 100257

_tmp = Path(tempfile.mkdtemp(prefix="granite-generate-tests-"))
atexit.register(shutil.rmtree, _tmp, True)


def with_tokenizer(folder: Path) -> Path:
    """Add the real tokenizer's files (keeping the checkpoint's own generation_config)."""
    for f in TOKENIZER.iterdir():
        if not (folder / f.name).exists():
            shutil.copy(f, folder / f.name)
    return folder


@cache
def tiny_folder(case: str) -> Path:
    """A committed tiny checkpoint plus the real tokenizer, in a temporary folder."""
    folder = _tmp / case
    shutil.copytree(checkpoint(case), folder)
    return with_tokenizer(folder)


@cache
def tiny(case: str):
    """(model, tokenizer) of a tiny case, float32 like the reference."""
    return load(tiny_folder(case), dtype="float32")


@cache
def real_vocab_folder(dense: bool = False) -> Path:
    """The real-vocabulary model: a NoPE hybrid, or (dense) an all-attention RoPE variant."""
    config = dict(REF["real_vocab"]["config"])
    if dense:
        config.update(layer_types=["attention"] * 4, position_embedding_type="rope")
    folder = _tmp / ("real_vocab_dense" if dense else "real_vocab")
    write_checkpoint(folder, config, REF["real_vocab"]["seed"])
    return with_tokenizer(folder)


@cache
def real_vocab(dense: bool = False):
    return load(real_vocab_folder(dense), dtype="float32")


def force(token_ids):
    """A logits processor that makes the model emit ``token_ids``, one per step."""
    pending = iter(list(token_ids))

    def processor(history: mx.array, logits: mx.array) -> mx.array:
        token = next(pending, None)
        if token is None:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == token, 0.0, -1e9)[None]

    return processor


def collect(responses) -> list[GenerationResponse]:
    return list(responses)


# --------------------------------------------------------------------------
# Greedy tokens equal transformers'
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(REF["cases"]))
def test_greedy_tokens_match_transformers(case):
    ref = REF["cases"][case]
    model, tokenizer = tiny(case)
    responses = collect(
        stream_generate(model, tokenizer, ref["prompt_ids"], max_tokens=len(ref["new_ids"]))
    )
    assert [r.token for r in responses] == ref["new_ids"]
    assert [r.finish_reason for r in responses] == [None] * (len(responses) - 1) + ["length"]
    last = responses[-1]
    assert last.prompt_tokens == len(ref["prompt_ids"]) and last.generation_tokens == 12
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0


@pytest.mark.parametrize("prompt", REF["real_vocab"]["prompts"], ids=lambda p: p["label"])
def test_real_vocab_text_prompts_match_transformers(prompt):
    model, tokenizer = real_vocab()
    assert encode_input(tokenizer, prompt["text"]) == prompt["prompt_ids"]
    n = len(prompt["new_ids"])
    tokens = [r.token for r in stream_generate(model, tokenizer, prompt["text"], max_tokens=n)]
    assert tokens == prompt["new_ids"]
    # generate() is the same stream, joined.
    text = generate(model, tokenizer, prompt["text"], max_tokens=n)
    assert text == tokenizer.decode(prompt["new_ids"]).lstrip(" ")


def test_chat_messages_render_like_the_reference_chat_prompt():
    model, tokenizer = real_vocab()
    chat = next(p for p in REF["real_vocab"]["prompts"] if p["label"] == "chat")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert encode_input(tokenizer, messages) == chat["prompt_ids"]
    tokens = [r.token for r in stream_generate(model, tokenizer, messages, max_tokens=4)]
    assert tokens == chat["new_ids"][:4]


def test_chunked_prefill_equals_one_shot_and_reports_progress():
    model, tokenizer = tiny("hybrid_nope")
    prompt = mx.load(str(REFERENCE / "hybrid_nope.safetensors"))["input_ids"][0].tolist()  # 37
    one_shot = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=8)]
    progress = []
    chunked = stream_generate(
        model, tokenizer, prompt, max_tokens=8, prefill_step_size=5,
        prompt_progress=lambda done, total: progress.append((done, total)),
    )  # fmt: skip
    assert [r.token for r in chunked] == one_shot
    assert progress == [(i, 37) for i in (0, 5, 10, 15, 20, 25, 30, 35, 36, 37)]


# --------------------------------------------------------------------------
# Text: EOS, stop strings, UTF-8, tool calls
# --------------------------------------------------------------------------


def forced_run(text: str, eos: bool = True, **options):
    model, tokenizer = real_vocab()
    ids = tokenizer.encode(text, add_special_tokens=False) + ([EOS] if eos else [])
    options.setdefault("max_tokens", len(ids) + 5)
    return collect(
        stream_generate(model, tokenizer, "Hi", logits_processors=[force(ids)], **options)
    ), ids


def test_eos_stops_and_is_not_shown():
    responses, ids = forced_run("Hello there.")
    assert "".join(r.text for r in responses) == "Hello there."
    assert responses[-1].finish_reason == "stop" and responses[-1].token == EOS
    assert len(responses) == len(ids) and responses[-1].generation_tokens == len(ids)


def test_stop_string_split_across_tokens_is_never_shown():
    _, tokenizer = real_vocab()
    text = "Hello world, this is a test."
    stop = "world, th"
    assert all(stop not in tokenizer.decode([t]) for t in tokenizer.encode(text))  # it is split
    responses, _ = forced_run(text, stop=["nope", stop])
    assert "".join(r.text for r in responses) == "Hello "
    assert responses[-1].finish_reason == "stop"
    assert all("w" not in r.text for r in responses)  # held back, then dropped


def test_a_stop_string_prefix_that_does_not_complete_is_released():
    responses, _ = forced_run("Hello world, this is a test.", stop="world!")
    assert "".join(r.text for r in responses) == "Hello world, this is a test."


def test_multi_token_emoji_is_never_broken():
    _, tokenizer = real_vocab()
    text = "Flowers 🌸🎉 and 東京!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # the emoji span several tokens
    responses, _ = forced_run(text)
    pieces = [r.text for r in responses]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_tool_call_streamed_in_pieces_never_shows_markup():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Boston"}}\n</tool_call>'
    responses, _ = forced_run("Let me check." + call)
    assert "".join(r.text for r in responses) == "Let me check."
    assert not any("<" in r.text or "{" in r.text for r in responses)
    calls = responses[-1].tool_calls  # the final response lists every call
    assert len(calls) == 1 and calls[0].valid
    assert calls[0].name == "get_weather" and calls[0].arguments == {"city": "Boston"}
    # Reported first at the step that closed it, before the final (EOS) response.
    assert responses[-2].tool_calls == calls
    assert [c for r in responses[:-1] for c in r.tool_calls] == calls


def test_tool_call_with_bad_json_is_reported_invalid_not_raised():
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {city: Boston}\n</tool_call>'
    responses, _ = forced_run(bad)
    calls = responses[-1].tool_calls
    assert len(calls) == 1 and not calls[0].valid and "JSON" in calls[0].error
    assert "".join(r.text for r in responses) == ""


def test_unterminated_tool_call_at_max_tokens_is_reported_invalid():
    _, tokenizer = real_vocab()
    text = '<tool_call>\n{"name": "f", "arguments": {}}'
    n = len(tokenizer.encode(text, add_special_tokens=False))
    responses, _ = forced_run(text, eos=False, max_tokens=n)
    assert responses[-1].finish_reason == "length"
    (call,) = responses[-1].tool_calls
    assert not call.valid and "unterminated" in call.error


def test_text_assembler_on_a_scripted_token_stream():
    """The response-assembly layer alone: stop strings and tool calls over scripted tokens."""
    _, tokenizer = real_vocab()
    script = 'A <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call> B STOP C'
    assembler = TextAssembler(tokenizer, stop=["STOP"])
    shown, calls = [], []
    for token in tokenizer.encode(script, add_special_tokens=False):
        text, new_calls = assembler.add(token)
        shown.append(text)
        calls += new_calls
        if assembler.stopped:
            break
    text, more = assembler.finish()
    shown.append(text)
    calls += more
    assert "".join(shown) == "A  B "
    assert [(c.name, c.arguments, c.valid) for c in calls] == [("f", {"x": 1}, True)]


# --------------------------------------------------------------------------
# Cancellation, seeds, options
# --------------------------------------------------------------------------


def test_cancel_event_stops_within_one_token():
    model, tokenizer = real_vocab()
    cancel = threading.Event()
    responses = []
    for r in stream_generate(model, tokenizer, "Hi", max_tokens=50, cancel=cancel):
        responses.append(r)
        if len(responses) == 3:
            cancel.set()
    assert len(responses) == 4
    assert responses[-1].finish_reason == "cancelled" and responses[-1].token is None
    assert [r.finish_reason for r in responses[:3]] == [None] * 3


def test_cancel_before_start_stops_in_prefill():
    model, tokenizer = tiny("hybrid_nope")
    cancel = threading.Event()
    cancel.set()
    cache = model.make_cache()
    prompt = list(range(1, 40))
    responses = collect(
        stream_generate(model, tokenizer, prompt, cache=cache, cancel=cancel, prefill_step_size=8)
    )
    assert [(r.finish_reason, r.generation_tokens) for r in responses] == [("cancelled", 0)]
    assert cache_length(cache) == 0


def test_closing_the_stream_stops_generation():
    model, tokenizer = tiny("hybrid_nope")
    cache = model.make_cache()
    stream = stream_generate(model, tokenizer, [5, 6, 7], cache=cache, max_tokens=50)
    next(stream), next(stream)
    stream.close()
    # Two tokens sampled; the second one's model call was already queued: no more.
    assert cache_length(cache) == 3 + 2
    with pytest.raises(StopIteration):
        next(stream)


def test_same_seed_same_answer_and_seeds_differ():
    model, tokenizer = real_vocab()

    def sample(seed):
        options = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 8, "seed": seed}
        return [r.token for r in stream_generate(model, tokenizer, "Hello", **options)]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_temperature_zero_is_greedy_and_the_default():
    model, tokenizer = tiny("moe_hybrid")
    ref = REF["cases"]["moe_hybrid"]
    tokens = [
        r.token
        for r in stream_generate(model, tokenizer, ref["prompt_ids"], temperature=0, max_tokens=5)
    ]
    assert tokens == ref["new_ids"][:5]


def test_repetition_penalty_changes_a_repeated_token():
    model, tokenizer = real_vocab()
    plain = next(p for p in REF["real_vocab"]["prompts"] if p["label"] == "plain")
    repeat = next(i for i in range(1, 16) if plain["new_ids"][i] == plain["new_ids"][i - 1])
    options = {"max_tokens": repeat + 1, "repetition_penalty": 1.5}
    tokens = [r.token for r in stream_generate(model, tokenizer, plain["text"], **options)]
    assert tokens[:repeat] == plain["new_ids"][:repeat]
    assert tokens[repeat] != plain["new_ids"][repeat]


def test_long_prompt_refused_unless_allowed(monkeypatch):
    model, tokenizer = tiny("hybrid_nope")
    monkeypatch.setattr(model.args, "max_position_embeddings", 16)
    prompt = list(range(1, 21))
    with pytest.raises(PromptTooLongError) as info:
        stream_generate(model, tokenizer, prompt)
    message = str(info.value)
    assert "20" in message and "16" in message and "allow_long_prompt=True" in message
    assert "NoPE" in message
    responses = collect(
        stream_generate(model, tokenizer, prompt, max_tokens=2, allow_long_prompt=True)
    )
    assert responses[-1].finish_reason == "length"


def test_bad_prompts_raise_generation_errors():
    model, tokenizer = tiny("hybrid_nope")
    with pytest.raises(GenerationError, match="empty"):
        stream_generate(model, tokenizer, [])
    with pytest.raises(GenerationError, match="vocabulary"):
        stream_generate(model, tokenizer, [1, 100000])
    with pytest.raises(GenerationError, match="messages"):
        stream_generate(model, tokenizer, "hi", tools=[{"name": "f"}])
    with pytest.raises(GenerationError, match="max_tokens"):
        stream_generate(model, tokenizer, [1], max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        stream_generate(model, tokenizer, [1], temperature=-1)


def test_eos_comes_from_the_tokenizer():
    """A token the tokenizer names as EOS ends the answer with "stop", unshown."""
    model, tokenizer = tiny("hybrid_nope")
    ref = REF["cases"]["hybrid_nope"]
    new = ref["new_ids"]
    first_new = next(i for i in range(1, len(new)) if new[i] not in new[:i])
    tokenizer = copy.copy(tokenizer)  # a copy: the shared one keeps its EOS
    tokenizer.eos_token_ids = {new[first_new]}
    responses = collect(stream_generate(model, tokenizer, ref["prompt_ids"], max_tokens=12))
    assert [r.token for r in responses] == new[: first_new + 1]
    assert responses[-1].finish_reason == "stop"
    before = generate(model, tiny("hybrid_nope")[1], ref["prompt_ids"], max_tokens=first_new)
    assert "".join(r.text for r in responses) == before


def test_prefill_reserves_the_kv_cache_once():
    """The KV buffers are sized for the whole prompt after the first chunk, so a
    long prefill never copies them (old and new alive together) as it goes."""
    from granite_mlx.cache import KVCache
    from granite_mlx.engine import default_prefill_step_size, feed
    from granite_mlx.shapes import random_model

    model = random_model("1b", dtype=mx.float32, hidden_size=32, num_attention_heads=2,
                         num_key_value_heads=1, shared_intermediate_size=48, vocab_size=100,
                         num_hidden_layers=1, layer_types=["attention"])  # fmt: skip
    cache = model.make_cache()
    kv = cache[0]
    assert isinstance(kv, KVCache)
    capacities = []
    tokens = mx.random.randint(0, 100, (1, 700), key=mx.random.key(1))
    ids = tokens[0].tolist()
    for i in range(0, 699, 64):  # as the engine prefills: all but the last token
        feed(model, cache, ids[i : min(i + 64, 699)], 700)
        capacities.append(kv.keys.shape[2])
    assert kv.offset == 699 and capacities[0] >= 700 and len(set(capacities)) == 1
    assert mx.default_device() != mx.cpu or default_prefill_step_size() == 256
    full = model(tokens)[:, -1]
    assert mx.allclose(model(tokens[:, -1:], cache)[:, -1], full, atol=1e-4)


# --------------------------------------------------------------------------
# Library misuse: one GenerationError naming the option, at the call
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"max_tokens": "100"}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": None}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": 10**9}, "top_k"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 1e23}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": ["ok", 5]}, "stop"),
        ({"logits_processors": [1]}, "logits_processors"),
        ({"top_logprobs": 99}, "top_logprobs"),
        ({"prefill_step_size": 0}, "prefill_step_size"),
    ],
)
def test_options_of_the_wrong_type_are_one_clear_error(options, name):
    model, tokenizer = tiny("hybrid_nope")
    with pytest.raises(GenerationError, match=name):
        stream_generate(model, tokenizer, [1, 2, 3], **options)


def test_batch_generate_refuses_a_single_string():
    from granite_mlx import batch_generate

    model, tokenizer = tiny("hybrid_nope")
    with pytest.raises(GenerationError, match="list of prompts"):
        batch_generate(model, tokenizer, "one string")


def test_complete_returns_the_text_and_every_tool_call():
    from granite_mlx import complete

    _, tokenizer = real_vocab()
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Boston"}}\n</tool_call>'
    text = "Checking." + call
    model, tokenizer = real_vocab()
    forced = tokenizer.encode(text, add_special_tokens=False) + [EOS]
    result = complete(model, tokenizer, "Weather?", logits_processors=[force(forced)])
    assert result.text == "Checking." and result.finish_reason == "stop"
    assert [c.name for c in result.tool_calls] == ["get_weather"]
    assert result.tool_calls[0].arguments == {"city": "Boston"}
    assert result.tokens == forced and result.generation_tokens == len(forced)
    assert generate(model, tokenizer, "Weather?", logits_processors=[force(forced)]) == "Checking."


def test_a_prompt_with_a_lone_surrogate_is_refused_naming_it():
    model, tokenizer = real_vocab()
    with pytest.raises(GenerationError, match="lone surrogate"):
        stream_generate(model, tokenizer, "bad \ud800 text")


def test_a_call_to_an_undeclared_tool_is_reported_invalid():
    from granite_mlx import complete

    model, tokenizer = real_vocab()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    call = '<tool_call>\n{"name": "delete_files", "arguments": {}}\n</tool_call>'
    forced = tokenizer.encode(call, add_special_tokens=False) + [EOS]
    messages = [{"role": "user", "content": "Weather?"}]
    result = complete(model, tokenizer, messages, tools=tools, logits_processors=[force(forced)])
    (bad,) = result.tool_calls
    assert not bad.valid and "delete_files" in bad.error
