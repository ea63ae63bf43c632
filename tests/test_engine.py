"""The engine against the reference: every row of a batch, whatever joins or leaves
beside it, answers exactly what the plain model call gives that request alone.

The reference loop here is the plain `Model.__call__` (no compiled step, no batch,
no engine): prefill the prompt in one call, then one call per token.
"""

from __future__ import annotations

import asyncio
import copy
import threading

import mlx.core as mx
import numpy as np
import pytest
from conftest import REFERENCE
from test_generate import real_vocab, tiny

from granite_mlx import cache as caches
from granite_mlx.engine import (
    Engine,
    EngineShutdown,
    EngineThread,
    QueueFullError,
    Request,
)
from granite_mlx.errors import GenerationError, PromptTooLongError
from granite_mlx.prompt_cache import PromptCache
from granite_mlx.sampling import SamplingError, SamplingParams

CASES = ["hybrid_nope", "dense_rope_untied", "moe_hybrid", "groups2"]


def prompts(case: str) -> list[list[int]]:
    ids = mx.load(str(REFERENCE / f"{case}.safetensors"))["input_ids"].tolist()
    return [ids[0][:23], ids[1][:6], ids[0][5:18], ids[1][:31], [ids[0][3]], ids[1][2:11]]


def reference(model, ids: list[int], n: int, mask=None) -> list[int]:
    """Greedy tokens from plain model calls; `mask(step)` -> allowed ids (or None)."""
    plain = model.compiled_decode
    model.compiled_decode = False
    try:
        cache = model.make_cache()
        logits = model(mx.array([ids]), cache)[0, -1]
        out = []
        for step in range(n):
            if mask is not None:
                allowed = mx.zeros(logits.shape, mx.bool_)
                allowed[mx.array(mask(step))] = True
                logits = mx.where(allowed, logits, -mx.inf)
            token = int(mx.argmax(logits).item())
            out.append(token)
            logits = model(mx.array([[token]]), cache)[0, -1]
        return out
    finally:
        model.compiled_decode = plain


def run(engine: Engine, plan: dict[int, list[Request]]) -> dict[int, list]:
    """Step the engine, adding plan[step]'s requests at that step; responses per request."""
    out: dict[int, list] = {}
    order: list[int] = []
    step = 0
    while engine.has_work or any(s >= step for s in plan):
        for r in plan.get(step, []):
            rid = engine.add(r)
            out[rid] = []
            order.append(rid)
        for rid, response in engine.step():
            out[rid].append(response)
        step += 1
    return {i: out[rid] for i, rid in enumerate(order)}


def tokens(responses) -> list[int]:
    return [r.token for r in responses if r.token is not None]


@pytest.mark.parametrize("case", CASES)
def test_rows_joining_and_leaving_answer_as_the_plain_model_does_alone(case):
    model, tokenizer = tiny(case)
    ps = prompts(case)
    lengths = [9, 4, 12, 6, 8, 5]
    plan = {0: [Request(ps[0], max_tokens=lengths[0]), Request(ps[1], max_tokens=lengths[1])],
            2: [Request(ps[2], max_tokens=lengths[2])],
            3: [Request(ps[3], max_tokens=lengths[3])],  # longer than the batch so far: shift
            7: [Request(ps[4], max_tokens=lengths[4])],  # a one-token prompt: nothing to prefill
            9: [Request(ps[5], max_tokens=lengths[5])]}  # fmt: skip
    got = run(Engine(model, tokenizer, max_batch=4, prefill_step_size=5), plan)
    for i, p in enumerate(ps):
        assert tokens(got[i]) == reference(model, p, lengths[i]), f"row {i}"
        assert got[i][-1].finish_reason == "length"
        assert [r.finish_reason for r in got[i][:-1]] == [None] * (len(got[i]) - 1)


def test_compiled_and_plain_steps_agree_in_a_padded_batch():
    model, tokenizer = tiny("dense_rope_untied")  # RoPE: each row rotates by its own position
    ps = prompts("dense_rope_untied")[:3]
    plan = {0: [Request(p, max_tokens=6) for p in ps]}
    compiled = run(Engine(model, tokenizer), plan)
    model.compiled_decode = False
    try:
        plain = run(Engine(model, tokenizer), plan)
    finally:
        model.compiled_decode = True
    for i in range(3):
        assert tokens(compiled[i]) == tokens(plain[i])
        np.testing.assert_allclose(
            [r.logprob for r in compiled[i]], [r.logprob for r in plain[i]], atol=1e-4
        )


def test_seeded_sampling_is_the_same_alone_and_in_a_batch():
    model, tokenizer = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    hot = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    alone = run(Engine(model, tokenizer), {0: [Request(ps[0], max_tokens=8, sampling=hot)]})
    mixed = run(Engine(model, tokenizer), {
        0: [Request(ps[1], max_tokens=5), Request(ps[0], max_tokens=8, sampling=hot)],
        1: [Request(ps[2], max_tokens=9, sampling=SamplingParams(temperature=0.7, seed=1))],
    })  # fmt: skip
    assert tokens(alone[0]) == tokens(mixed[1])
    other = run(Engine(model, tokenizer), {0: [
        Request(ps[0], max_tokens=8, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=8))
    ]})  # fmt: skip
    assert tokens(other[0]) != tokens(alone[0])


def test_stop_strings_and_eos_end_rows_independently():
    model, tokenizer = real_vocab()
    ps = [tokenizer.encode(t) for t in ("Once upon a time", "The weather today is")]
    alone = reference(model, ps[0], 10)
    shown = tokenizer.decode(alone[:4])
    stop = tokenizer.decode(alone[:6])[len(shown) :][:3]
    assert stop.strip()
    eos = alone[2]
    tokenizer = copy.copy(tokenizer)
    plan = {0: [Request(ps[0], max_tokens=10, stop=[stop]), Request(ps[1], max_tokens=10)]}
    got = run(Engine(model, tokenizer), plan)
    assert got[0][-1].finish_reason == "stop" and len(got[0]) <= 6
    assert stop not in "".join(r.text for r in got[0])
    assert tokens(got[1]) == reference(model, ps[1], 10)
    # An EOS that one row samples early and the other never samples.
    tokenizer.eos_token_ids = {eos}
    got = run(Engine(model, tokenizer), {0: [Request(p, max_tokens=10) for p in ps]})
    assert tokens(got[0]) == alone[:3] and got[0][-1].finish_reason == "stop"
    if eos not in reference(model, ps[1], 10):
        assert tokens(got[1]) == reference(model, ps[1], 10)


def test_abort_ends_one_row_and_spares_the_others():
    model, tokenizer = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    engine = Engine(model, tokenizer)
    a = engine.add(Request(ps[0], max_tokens=20))
    b = engine.add(Request(ps[1], max_tokens=8))
    out = {a: [], b: []}
    while engine.has_work:
        for rid, r in engine.step():
            out[rid].append(r)
        if len(out[a]) == 3:
            engine.abort(a)
    assert out[a][-1].finish_reason == "cancelled" and out[a][-1].token is None
    assert len(tokens(out[a])) == 3
    assert tokens(out[b]) == reference(model, ps[1], 8)


def test_the_callers_cache_ends_holding_a_prefix_of_prompt_and_answer():
    model, tokenizer = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    cache = model.make_cache()
    plan = {0: [Request(ps[0], max_tokens=5, cache=cache), Request(ps[1], max_tokens=9)]}
    got = run(Engine(model, tokenizer), plan)
    held = caches.cache_length(cache)
    ids = ps[0] + tokens(got[0])
    assert len(ps[0]) + 4 <= held <= len(ids)
    # Continuing from that cache equals a fresh run over the same tokens.
    nxt = run(Engine(model, tokenizer), {0: [Request([7, 8], cache=cache, max_tokens=4)]})
    assert tokens(nxt[0]) == reference(model, ids[:held] + [7, 8], 4)


def test_a_constraint_masks_every_step():
    """Greedy constrained output is the argmax of the masked logits at every step."""
    model, tokenizer = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    allowed = [[3, 4, 5], [10, 11], [200, 201, 202, 203], [7], [8, 9, 10, 11, 12]]

    class Fixed:
        def __init__(self, packed: bool):
            self.step, self.packed, self.seen = 0, packed, []

        def mask(self):
            m = np.zeros(512, np.bool_)
            m[allowed[self.step]] = True
            if self.packed:
                return np.packbits(m, bitorder="little").view(np.uint32)
            return m

        def advance(self, token):
            self.seen.append(token)
            self.step += 1

        def is_finished(self):
            return self.step == len(allowed)

    c1, c2 = Fixed(False), Fixed(True)
    plan = {0: [Request(ps[0], max_tokens=20, constraint=c1), Request(ps[1], max_tokens=7),
                Request(ps[2], max_tokens=20, constraint=c2)]}  # fmt: skip
    got = run(Engine(model, tokenizer), plan)
    want = reference(model, ps[0], len(allowed), mask=lambda s: allowed[s])
    assert tokens(got[0]) == want == c1.seen
    assert got[0][-1].finish_reason == "stop"
    assert tokens(got[2]) == reference(model, ps[2], len(allowed), mask=lambda s: allowed[s])
    assert tokens(got[1]) == reference(model, ps[1], 7)  # the unconstrained row is unchanged


def test_top_logprobs_are_the_models():
    model, tokenizer = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    got = run(Engine(model, tokenizer), {0: [Request(ps[0], max_tokens=3, top_logprobs=4)]})[0]
    cache = model.make_cache()
    logits = model(mx.array([ps[0]]), cache)[0, -1]
    lp = (logits - mx.logsumexp(logits)).tolist()
    best = sorted(range(len(lp)), key=lambda i: -lp[i])[:4]
    first = got[0]
    assert [t for t, _ in first.top_logprobs] == best
    np.testing.assert_allclose([v for _, v in first.top_logprobs], [lp[i] for i in best], atol=1e-4)
    assert first.token == best[0] and abs(first.logprob - lp[best[0]]) < 1e-4


# --------------------------------------------------------------------------
# Prompt cache
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["hybrid_nope", "dense_rope_untied"])
def test_prompt_cache_resumes_exactly(case):
    model, tokenizer = tiny(case)
    ps = prompts(case)
    system = ps[0]  # a shared prefix, then different questions
    first = system + ps[1]
    pc = PromptCache(2**30)
    engine = Engine(model, tokenizer, prompt_cache=pc)
    a = run(engine, {0: [Request(first, max_tokens=6, snapshot_at=[len(system)])]})[0]
    assert a[-1].cached_tokens == 0 and a[-1].prompt_tokens == len(first)
    # The same prompt again (a regenerate): all of it is reused, and the first token comes
    # from the logits recorded after it.
    again = run(engine, {0: [Request(first, max_tokens=6)]})[0]
    assert tokens(again) == tokens(a) and again[-1].cached_tokens == len(first)
    # A new question after the same system prompt: resumes at the message boundary.
    second = system + ps[2]
    b = run(engine, {0: [Request(second, max_tokens=6)]})[0]
    assert b[-1].cached_tokens == len(system)
    assert tokens(b) == reference(model, second, 6)
    # The conversation continued (prompt + answer + more): resumes after the answer.
    cont = first + tokens(a) + ps[3]
    c = run(engine, {0: [Request(cont, max_tokens=4)]})[0]
    assert c[-1].cached_tokens >= len(first) + len(tokens(a)) - 1
    assert tokens(c) == reference(model, cont, 4)


def test_the_same_prompt_again_needs_no_model_pass_before_its_first_token(monkeypatch):
    from granite_mlx.model import Model

    model, tokenizer = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    prompt = ps[0] + ps[1]
    engine = Engine(model, tokenizer, prompt_cache=PromptCache(2**30))
    options = [{}, {"sampling": SamplingParams(temperature=0.9, seed=5), "top_logprobs": 3}]
    first = [run(engine, {0: [Request(prompt, max_tokens=5, **o)]})[0] for o in options]
    assert tokens(first[0]) == reference(model, prompt, 5)
    passes = []
    real_call = Model.__call__

    def counted(self, *args, **kwargs):
        passes.append(args[0].shape)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(Model, "__call__", counted)
    for o, before in zip(options, first):
        passes.clear()
        one = run(engine, {0: [Request(prompt, max_tokens=1, **o)]})[0]
        assert passes == []  # its one token came from the logits recorded after the prompt
        assert one[0].cached_tokens == len(prompt) and one[0].token == before[0].token
        assert one[0].top_logprobs == before[0].top_logprobs
        # A longer answer goes on from there: the same tokens as the first time.
        again = run(engine, {0: [Request(prompt, max_tokens=5, **o)]})[0]
        assert tokens(again) == tokens(before) and len(passes) == 4


def test_a_snapshot_point_just_after_the_resume_point_costs_no_pass_of_its_own(monkeypatch):
    import granite_mlx.engine as engine_module

    model, tokenizer = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    pc = PromptCache(2**30)
    engine = Engine(model, tokenizer, prompt_cache=pc)
    first = ps[0] + ps[1]
    answer = tokens(run(engine, {0: [Request(first, max_tokens=4)]})[0])
    chunks: list[int] = []
    real_feed = engine_module.feed
    monkeypatch.setattr(
        engine_module,
        "feed",
        lambda m, c, ids, total: (chunks.append(len(ids)), real_feed(m, c, ids, total)),
    )
    # The next turn resumes at the answer's end (its last token was never fed); the message
    # boundary a few tokens on (an end-of-text and a newline) is left to whichever request
    # might resume there.
    resumed = len(first) + len(answer) - 1
    near, far = resumed + 2, resumed + engine_module.MIN_SNAPSHOT_GAP
    cont = first + answer + ps[2] + ps[3]
    assert far < len(cont) - 1
    got = run(engine, {0: [Request(cont, max_tokens=4, snapshot_at=[near])]})[0]
    assert got[-1].cached_tokens == resumed and chunks == [len(cont) - 1 - resumed]
    assert tokens(got) == reference(model, cont, 4)
    assert near not in pc.states(cont)
    # One far enough from it is kept, at the cost of cutting the chunk there.
    chunks.clear()
    other = first + answer + ps[3] + ps[2]
    got = run(engine, {0: [Request(other, max_tokens=4, snapshot_at=[far])]})[0]
    assert chunks == [far - resumed, len(other) - 1 - far] and far in pc.states(other)
    assert tokens(got) == reference(model, other, 4)


def test_prompt_cache_keeps_to_its_budget_dropping_the_least_recently_used():
    model, tokenizer = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    one = PromptCache(2**30)
    list(Engine(model, tokenizer, prompt_cache=one).generate(Request(ps[0], max_tokens=2)))
    size = one.nbytes
    pc = PromptCache(int(size * 2.5))
    engine = Engine(model, tokenizer, prompt_cache=pc)
    for p in (ps[0], ps[2], ps[3]):
        list(engine.generate(Request(p, max_tokens=2)))
        assert pc.nbytes <= pc.max_bytes
    assert pc.evictions > 0
    # The most recent prompt is still there; the oldest is gone.
    assert pc.lookup(ps[3], limit=len(ps[3]) - 1) is not None
    assert pc.lookup(ps[0], limit=len(ps[0]) - 1) is None


def test_prompt_cache_holds_what_it_counts():
    """Snapshots own their buffers: MLX's active memory grows by the prompt cache's
    nbytes, not more (a snapshot that is a view keeps its whole source buffer alive,
    e.g. a prefill chunk's conv input, and the byte budget would not see it)."""
    import gc

    model, tokenizer = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    pc = PromptCache(2**30)
    engine = Engine(model, tokenizer, prompt_cache=pc, prefill_step_size=4)
    list(engine.generate(Request(ps[4], max_tokens=2)))  # warm up
    gc.collect()
    before, counted = mx.get_active_memory(), pc.nbytes
    for p in (ps[0], ps[2], ps[3], ps[5]):
        list(engine.generate(Request(p, max_tokens=3, snapshot_at=[3, 7, 11])))
    gc.collect()
    grown = mx.get_active_memory() - before
    assert grown <= (pc.nbytes - counted) * 1.05 + 4096, (grown, pc.nbytes - counted)


def test_cache_rows_merge_take_and_come_back_exactly():
    model, _ = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    singles = []
    for p in ps[:3]:
        c = model.make_cache()
        model(mx.array([p]), c)
        singles.append(c)
    batch = caches.merge(caches.merge(singles[0], singles[1]), singles[2])
    assert caches.batch_size(batch) == 3 and caches.cache_length(batch) == max(map(len, ps[:3]))
    for i, c in enumerate(singles):
        back = caches.row(batch, i)
        for x, y in zip(back, c):
            for name, arr in y.arrays.items():
                assert mx.array_equal(x.arrays[name], arr), (i, name)
    two = caches.take(batch, [2, 0])
    for j, i in enumerate([2, 0]):
        back = caches.row(two, j)
        for x, y in zip(back, singles[i]):
            for name, arr in y.arrays.items():
                assert mx.array_equal(x.arrays[name], arr)


# --------------------------------------------------------------------------
# Bad requests: one clear error at add() time
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (Request([]), "empty"),
        (Request("hello"), "list of token ids"),
        (Request([1, 2, 99999]), "outside this model's vocabulary"),
        (Request([1, "2"]), "integers"),
        (Request([1], max_tokens=0), "max_tokens"),
        (Request([1], max_tokens="10"), "max_tokens"),
        (Request([1], stop="x"), "stop"),
        (Request([1], top_logprobs=50), "top_logprobs"),
        (Request([1], sampling=SamplingParams(temperature=float("nan"))), "temperature"),
        (Request([1], sampling=SamplingParams(temperature="0.5")), "temperature"),
        (Request([1], sampling=SamplingParams(top_k=10**6)), "top_k"),
        (Request([1], sampling=SamplingParams(seed=-1)), "seed"),
        (Request([1] * 5000), "max_position_embeddings"),
    ],
)
def test_bad_requests_are_refused_at_add(request_, match):
    model, tokenizer = tiny("hybrid_nope")
    engine = Engine(model, tokenizer)
    with pytest.raises((GenerationError, SamplingError, PromptTooLongError), match=match):
        engine.add(request_)
    assert not engine.has_work


# --------------------------------------------------------------------------
# The engine on its own thread
# --------------------------------------------------------------------------


def test_a_request_being_added_counts_as_waiting():
    """max_queue holds while the engine thread is adding a request: a submit in that
    moment must count it (it is neither still submitted nor already queued)."""
    import time

    model, tokenizer = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    t = EngineThread(model, tokenizer, max_batch=1, max_queue=1)
    try:

        def slow(history, logits):  # keeps the first request running meanwhile
            time.sleep(0.05)
            return logits

        running = t.submit(Request(ps[0], max_tokens=40, logits_processors=[slow]))
        deadline = time.monotonic() + 10
        while t.load != (1, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        adding, release = threading.Event(), threading.Event()
        real_add = t.engine.add

        def slow_add(request):
            adding.set()
            release.wait(10)
            return real_add(request)

        t.engine.add = slow_add
        queued = t.submit(Request(ps[1], max_tokens=2))  # the one place in the queue
        assert adding.wait(10)
        outcome = []

        def third():
            try:
                outcome.append(t.submit(Request(ps[2], max_tokens=2)))
            except QueueFullError as exc:
                outcome.append(exc)

        other = threading.Thread(target=third)
        other.start()
        other.join(0.3)
        release.set()
        other.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], QueueFullError), outcome
        running.cancel()
        assert [r.finish_reason for r in queued][-1] == "length"
    finally:
        t.shutdown()


def test_engine_thread_serves_threads_and_asyncio_and_stops_cleanly():
    model, tokenizer = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    t = EngineThread(model, tokenizer, max_batch=3, max_queue=2)
    try:
        results: dict[int, list[int]] = {}

        def client(i):
            results[i] = tokens(t.submit(Request(ps[i], max_tokens=5)))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        for i in range(2):
            assert results[i] == reference(model, ps[i], 5)

        async def consume():
            stream = t.submit(Request(ps[2], max_tokens=4))
            return [r.token async for r in stream]

        assert asyncio.run(consume()) == reference(model, ps[2], 4)

        with pytest.raises(GenerationError):
            t.submit(Request([1], max_tokens=0))  # refused at once, synchronously

        # Cancel: the stream ends with a "cancelled" response.
        stream = t.submit(Request(ps[0], max_tokens=200))
        got = []
        for r in stream:
            got.append(r)
            if len(got) == 2:
                stream.cancel()
        assert got[-1].finish_reason == "cancelled"

        # A full queue answers at once.
        gate = threading.Event()
        slow = [Request(ps[0], max_tokens=50, prompt_progress=lambda d, n: gate.wait(5))]
        streams = [t.submit(r) for r in slow]
        with pytest.raises(QueueFullError):
            for _ in range(3):
                streams.append(t.submit(Request(ps[1], max_tokens=2)))
        gate.set()
        for s in streams:
            s.cancel()
            list(s)
    finally:
        t.shutdown()


def test_shutdown_ends_running_streams_with_an_error():
    model, tokenizer = tiny("hybrid_nope")
    t = EngineThread(model, tokenizer)
    stream = t.submit(Request(prompts("hybrid_nope")[0], max_tokens=10_000))
    it = iter(stream)
    next(it)
    t.shutdown()
    with pytest.raises(EngineShutdown):
        for _ in it:
            pass
    with pytest.raises(EngineShutdown):
        t.submit(Request([1, 2], max_tokens=2))


def test_real_vocab_batch_equals_solo_runs():
    model, tokenizer = real_vocab()
    texts = ["Hello, world!", "The capital of France is", "1, 2, 3,"]
    ids = [tokenizer.encode(t) for t in texts]
    got = run(Engine(model, tokenizer), {0: [Request(i, max_tokens=6) for i in ids]})
    for i, p in enumerate(ids):
        assert tokens(got[i]) == reference(model, p, 6)


def test_aborting_every_row_at_once_ends_them_all():
    model, tokenizer = tiny("hybrid_nope")
    ps = prompts("hybrid_nope")
    engine = Engine(model, tokenizer)
    rids = [engine.add(Request(p, max_tokens=30)) for p in ps[:3]]
    for _ in range(6):
        engine.step()
    for rid in rids:
        engine.abort(rid)
    finals = [r for _, r in engine.step()]
    assert [r.finish_reason for r in finals] == ["cancelled"] * 3 and not engine.has_work
