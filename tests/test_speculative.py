"""Speculative decoding: exact rollback of hybrid caches, greedy output identical to
plain decoding, and the sampled output distribution equal to the target's.

Plain decoding (`stream_generate` without a drafter, itself tested against
transformers) is the reference. Drafters: the target itself (agrees almost
always), another random model with the same vocabulary (rarely agrees), prompt
lookup, and scripted drafters that reject at chosen positions.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoint_factory import config_for, write_checkpoint
from conftest import REFERENCE, checkpoint
from scipy.stats import chisquare
from test_generate import EOS, real_vocab, tiny

from granite_mlx import ChatSession, load_model, ssm, stream_generate
from granite_mlx.cache import (
    KVCache,
    MambaCache,
    cache_length,
    record,
    rewind,
    snapshot,
)
from granite_mlx.errors import GraniteError
from granite_mlx.sampling import RowSampler, SamplingParams
from granite_mlx.speculative import (
    Drafter,
    DraftError,
    DraftModel,
    PromptLookup,
    Proposal,
    Speculator,
    make_drafter,
    speculative_sample,
    tokenizer_fingerprint,
)

CASES = ["hybrid_nope", "dense_rope_untied", "moe_hybrid", "groups2"]
_tmp = Path(tempfile.mkdtemp(prefix="granite-spec-tests-"))
atexit.register(shutil.rmtree, _tmp, True)


def ref_tokens(case="hybrid_nope"):
    return mx.load(str(REFERENCE / f"{case}.safetensors"))["input_ids"]


@cache
def other_model():
    """A random model with the tiny cases' vocabulary (512) but other weights."""
    return load_model(write_checkpoint(_tmp / "other", config_for("hybrid_nope"), seed=7))


def tokens_of(responses) -> list[int]:
    return [r.token for r in responses]


# A prompt whose second half repeats its first, so prompt lookup finds n-grams.
PROMPT = [5, 17, 301, 44, 9, 120, 77, 3, 250, 18, 5, 17, 301, 44, 9, 120]


def force_pure(ids: list[int], start: int):
    """A logits processor forcing ``ids`` after a history of ``start`` tokens. A
    pure function of the history (as processors must be with a drafter: they
    also see drafted positions that get rejected)."""

    def processor(history: mx.array, logits: mx.array) -> mx.array:
        i = history.shape[0] - start
        if not 0 <= i < len(ids):
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == ids[i], 0.0, -1e9)[None]

    return processor


class Scripted(Drafter):
    """Proposes the target's known continuation, optionally wrong at one
    position per step (cycling), to force rejections wherever wanted."""

    def __init__(self, answer: list[int], prompt_len: int, wrong_at: int | None = None):
        self.answer, self.prompt_len, self.wrong_at = answer, prompt_len, wrong_at
        self.steps = 0

    def propose(self, context, k, sampler):
        done = len(context) - self.prompt_len  # answer tokens already in the context
        drafts = list(self.answer[done : done + k])
        if self.wrong_at is not None and drafts:
            j = (self.wrong_at + self.steps) % len(drafts)
            drafts[j] = (drafts[j] + 1) % 512
        self.steps += 1
        return Proposal(mx.array(drafts, dtype=mx.int32))


# --------------------------------------------------------------------------
# Rollback: the caches after a partly undone pass equal those of the kept tokens
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["hybrid_nope", "groups2", "dense_rope_untied"])
def test_rewind_equals_feeding_only_the_kept_tokens(case):
    model = load_model(checkpoint(case))
    t = ref_tokens(case)[:1]
    for keep in range(10):
        c = model.make_cache()
        model(t[:, :12], c)
        record(c)
        model(t[:, 12:21], c)  # 9 positions, as verifying 8 drafts
        record(c, False)
        rewind(c, 9 - keep)
        ref = model.make_cache()
        model(t[:, : 12 + keep], ref)
        assert cache_length(c) == cache_length(ref) == 12 + keep
        for a, b in zip(c, ref):
            if isinstance(a, MambaCache):
                assert mx.allclose(a.ssm_state, b.ssm_state, atol=1e-5)
                assert mx.allclose(a.conv_state, b.conv_state, atol=1e-5)
        # And the model continues from both alike.
        assert mx.allclose(model(t[:, 30:34], c), model(t[:, 30:34], ref), atol=1e-4)


def test_rewind_twice_within_one_record_and_the_record_expires():
    model = load_model(checkpoint("hybrid_nope"))
    t = ref_tokens()[:1]
    c = model.make_cache()
    model(t[:, :10], c)
    record(c)
    model(t[:, 10:16], c)
    record(c, False)
    rewind(c, 2)  # as a step emitting 4 tokens
    rewind(c, 3)  # then its consumer keeping only the first
    ref = model.make_cache()
    model(t[:, :11], ref)
    mamba = [i for i, x in enumerate(c) if isinstance(x, MambaCache)]
    assert all(mx.allclose(c[i].ssm_state, ref[i].ssm_state, atol=1e-5) for i in mamba)
    with pytest.raises(ValueError, match="cannot rewind 2 tokens"):
        rewind(c, 2)  # past the start of the recorded call
    model(t[:, 11:12], c)  # any other update voids the record...
    offsets = [x.offset for x in c]
    with pytest.raises(ValueError, match="no record"):
        rewind(c, 1)
    assert [x.offset for x in c] == offsets  # ...and a refused rewind changes nothing


def test_state_after_equals_the_recurrence():
    b, l, h, p, g, n = 2, 7, 6, 4, 3, 5
    k = iter(mx.random.split(mx.random.key(3), 6))
    x = mx.random.normal((b, l, h, p), key=next(k))
    dt = mx.random.uniform(0.01, 0.5, (b, l, h), key=next(k))
    A = -mx.random.uniform(0.5, 4.0, (h,), key=next(k))
    B = mx.random.normal((b, l, g, n), key=next(k))
    C = mx.random.normal((b, l, g, n), key=next(k))
    s0 = mx.random.normal((b, h, p, n), key=next(k))
    for init in (None, s0):
        _, want = ssm.sequential_scan(x, dt, A, B, C, mx.ones((h,)), init)
        assert mx.allclose(ssm.state_after(x, dt, A, B, init), want, atol=1e-5)


# --------------------------------------------------------------------------
# Greedy: token-identical to plain decoding
# --------------------------------------------------------------------------


def drafter_for(kind: str, model):
    if kind == "self":
        return DraftModel(model)
    if kind == "other":
        return DraftModel(other_model())
    return PromptLookup()


@pytest.mark.parametrize("kind", ["self", "other", "lookup"])
@pytest.mark.parametrize("case", CASES)
def test_greedy_output_identical_to_plain_decoding(case, kind):
    model, tokenizer = tiny(case)
    plain = list(stream_generate(model, tokenizer, PROMPT, max_tokens=20))
    ks = range(1, 9) if case == "hybrid_nope" else (1, 3, 8)
    for k in ks:
        drafter = drafter_for(kind, model)
        rs = list(stream_generate(
            model, tokenizer, PROMPT, max_tokens=20, draft_model=drafter, num_draft_tokens=k
        ))  # fmt: skip
        assert tokens_of(rs) == tokens_of(plain), (case, kind, k)
        assert [r.finish_reason for r in rs] == [r.finish_reason for r in plain]
        assert [r.text for r in rs] == [r.text for r in plain]
        drafted, accepted = rs[-1].drafted_tokens, rs[-1].accepted_tokens
        assert 0 <= accepted <= drafted
        if kind == "self":  # drafting for itself, every draft is the target's own token
            assert drafted > 0 and drafted - accepted <= k  # (but those cut by an EOS)
    if kind == "other":  # the other model rarely agrees: the rollback paths ran
        assert accepted < drafted / 2


@pytest.mark.parametrize("case", ["hybrid_nope", "groups2", "moe_hybrid"])
def test_rejection_at_every_draft_position(case):
    model, tokenizer = tiny(case)
    plain = tokens_of(stream_generate(model, tokenizer, PROMPT, max_tokens=24))
    for k in (2, 5, 8):
        for wrong_at in range(k):
            drafter = Scripted(plain, len(PROMPT), wrong_at)
            spec = list(stream_generate(
                model, tokenizer, PROMPT, max_tokens=24, draft_model=drafter,
                num_draft_tokens=k,
            ))  # fmt: skip
            assert tokens_of(spec) == plain, (k, wrong_at)


def test_prompt_lookup_option_and_generate():
    model, tokenizer = tiny("hybrid_nope")
    plain = tokens_of(stream_generate(model, tokenizer, PROMPT, max_tokens=16))
    rs = list(stream_generate(model, tokenizer, PROMPT, max_tokens=16, prompt_lookup=3))
    assert tokens_of(rs) == plain and rs[-1].drafted_tokens > 0
    from granite_mlx import generate

    assert generate(model, tokenizer, PROMPT, max_tokens=16, prompt_lookup=5) == generate(
        model, tokenizer, PROMPT, max_tokens=16
    )


def test_max_tokens_is_met_exactly_and_the_cache_holds_a_prefix():
    model, tokenizer = tiny("hybrid_nope")
    plain = tokens_of(stream_generate(model, tokenizer, PROMPT, max_tokens=30))
    for max_tokens in (1, 2, 7, 13):
        c = model.make_cache()
        rs = list(stream_generate(
            model, tokenizer, PROMPT, max_tokens=max_tokens, cache=c,
            draft_model=DraftModel(model), num_draft_tokens=8,
        ))  # fmt: skip
        assert tokens_of(rs) == plain[:max_tokens]
        assert [r.finish_reason for r in rs][-1] == "length"
        assert cache_length(c) == len(PROMPT) + max_tokens - 1  # the last token never fed


def test_stop_string_inside_a_step_rolls_the_cache_back_to_it():
    """All drafts accepted, a stop string completed mid-step: the text stops there,
    and the cache holds exactly the tokens up to it (continuing from it equals a
    fresh run over the same tokens)."""
    model, tokenizer = real_vocab()
    prompt = tokenizer.encode("Say it.", add_special_tokens=False)
    text = "Hello world, this is a test of stopping."
    answer = tokenizer.encode(text, add_special_tokens=False)
    force = force_pure(answer, len(prompt))
    c = model.make_cache()
    rs = list(stream_generate(
        model, tokenizer, prompt, cache=c, stop="is a", logits_processors=[force],
        draft_model=Scripted(answer, len(prompt)), num_draft_tokens=8, max_tokens=40,
    ))  # fmt: skip
    assert "".join(r.text for r in rs) == "Hello world, this "
    assert rs[-1].finish_reason == "stop"
    emitted = tokens_of(rs)
    assert emitted == answer[: len(emitted)] and len(emitted) < 9  # stopped inside step one
    assert rs[-1].drafted_tokens == 8 and rs[-1].accepted_tokens == len(emitted)
    assert cache_length(c) == len(prompt) + len(emitted) - 1
    # The rolled-back cache continues exactly like a fresh one over the same tokens.
    fresh = model.make_cache()
    model(mx.array([prompt + emitted[:-1]]), fresh)
    nxt = mx.array([[emitted[-1]]])
    assert mx.allclose(model(nxt, c), model(nxt, fresh), atol=1e-4)


def test_eos_inside_a_step_ends_the_answer_there():
    model, tokenizer = real_vocab()
    prompt = tokenizer.encode("Hi", add_special_tokens=False)
    answer = tokenizer.encode("Short one.", add_special_tokens=False) + [EOS, 42, 43]
    rs = list(stream_generate(
        model, tokenizer, prompt, logits_processors=[force_pure(answer, len(prompt))],
        prompt_lookup=None, draft_model=Scripted(answer, len(prompt)), num_draft_tokens=8,
    ))  # fmt: skip
    assert tokens_of(rs) == answer[: answer.index(EOS) + 1]
    assert rs[-1].finish_reason == "stop" and "".join(r.text for r in rs) == "Short one."


@pytest.mark.parametrize("dense", [False, True], ids=["hybrid", "dense"])
def test_chat_session_turns_identical_with_a_drafter(dense):
    """Across a cache that already holds earlier turns; the draft model keeps its
    own cache from turn to turn."""
    model, tokenizer = real_vocab(dense)
    questions = ["What is the capital of France?", "And of Italy?", "Thanks!"]
    plain = ChatSession(model, tokenizer, system="Be brief.")
    want = [tokens_of(plain.send(q, max_tokens=10)) for q in questions]
    for options in ({"draft_model": model, "num_draft_tokens": 3}, {"prompt_lookup": 4}):
        s = ChatSession(model, tokenizer, system="Be brief.")
        got = [tokens_of(s.send(q, max_tokens=10, **options)) for q in questions]
        assert got == want
        assert s.messages == plain.messages
    drafter = s._drafter if "draft_model" in options else None
    assert drafter is None or isinstance(drafter[2], DraftModel)


def test_draft_model_resumes_across_turns_without_reprefilling():
    model, tokenizer = real_vocab()
    s = ChatSession(model, tokenizer)
    list(s.send("One?", max_tokens=6, draft_model=model, num_draft_tokens=2))
    drafter = s._drafter[2]
    held = len(drafter.ids)
    cache_before = drafter.cache
    list(s.send("Two?", max_tokens=6, draft_model=model, num_draft_tokens=2))
    assert drafter.cache is cache_before and len(drafter.ids) > held  # kept, extended


def test_speculator_keep_rolls_back_within_the_last_step():
    model = load_model(checkpoint("hybrid_nope"))
    model_ref = model
    prompt = PROMPT
    c = model.make_cache()
    model(mx.array([prompt[:-1]]), c)
    spec = Speculator(model, c, DraftModel(model), 6, RowSampler(SamplingParams()), prompt[:-1])
    step = spec.step(prompt[-1])
    assert len(step.tokens) == 7 and step.accepted == 6
    spec.keep(3)
    assert cache_length(c) == len(prompt) + 2 and spec.accepted == 3
    fresh = model_ref.make_cache()
    model(mx.array([prompt + step.tokens[:2]]), fresh)
    nxt = mx.array([[step.tokens[2]]])
    assert mx.allclose(model(nxt, c), model(nxt, fresh), atol=1e-4)
    with pytest.raises(ValueError, match="cannot keep 4"):
        spec.keep(4)


# --------------------------------------------------------------------------
# Sampling: the output distribution is the target's
# --------------------------------------------------------------------------


def pooled_chisquare(counts: np.ndarray, probs: np.ndarray):
    """Chi-square of counts against probabilities, cells expecting < 5 pooled."""
    probs = np.asarray(probs, np.float64)
    expected = probs / probs.sum() * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp)


def markov_speculative(P, Q, k, n_rows, length, deterministic=False, rule=speculative_sample):
    """Many rows decoded speculatively at once with order-1 Markov target P and
    draft Q (V x V): each step drafts k tokens from Q (or Q's argmax), verifies
    them through ``rule`` and keeps what it accepts. Returns (rows, length)."""
    Pm, Qm = mx.array(P), mx.array(Q)
    out = [[] for _ in range(n_rows)]
    last = np.zeros(n_rows, np.int32)
    rows = np.arange(n_rows)
    while rows.size:
        cur = mx.array(last[rows])
        start = cur
        drafts, qs = [], []
        for _ in range(k):
            if deterministic:
                d = mx.argmax(Qm[cur], axis=-1)
            else:
                qs.append(Qm[cur])
                d = mx.random.categorical(mx.log(Qm[cur]))
            drafts.append(d)
            cur = d
        drafts = mx.stack(drafts, axis=1).astype(mx.int32)  # (rows, k)
        p = Pm[mx.concatenate([start[:, None], drafts], axis=1)]  # (rows, k+1, V)
        chosen, keep = rule(p, drafts, None if deterministic else mx.stack(qs, axis=1))
        chosen, keep, drafts = np.array(chosen), np.array(keep), np.array(drafts)
        accepted = np.where(keep.all(axis=1), k, keep.argmin(axis=1))
        for j, r in enumerate(rows):
            out[r] += drafts[j, : accepted[j]].tolist() + [int(chosen[j, accepted[j]])]
            last[r] = out[r][-1]
        rows = np.array([r for r in rows if len(out[r]) < length], dtype=np.int64)
    return np.array([o[:length] for o in out])


def joint_probabilities(P, length):
    """p(x1..xn) of the Markov target started after token 0, flattened row-major."""
    probs = P[0]
    for _ in range(length - 1):
        probs = probs[..., None] * P  # (V,)*t x (V, V) -> (V,)*(t+1)
    return probs.reshape(-1)


@pytest.mark.parametrize("deterministic", [False, True], ids=["draft-model", "prompt-lookup"])
def test_speculative_sampling_has_the_targets_distribution(deterministic):
    V, k, length, n = 4, 3, 3, 30000
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.full(V, 0.7), size=V).astype(np.float32)
    Q = rng.dirichlet(np.full(V, 0.7), size=V).astype(np.float32)
    mx.random.seed(1)
    seqs = markov_speculative(P, Q, k, n, length, deterministic)
    counts = np.bincount(np.ravel_multi_index(seqs.T, (V,) * length), minlength=V**length)
    assert pooled_chisquare(counts, joint_probabilities(P, length)).pvalue > 1e-3

    # The test has power: a rule that keeps every draft gives the draft's distribution.
    def keep_all(p, drafts, q):
        chosen, keep = speculative_sample(p, drafts, q)
        return chosen, mx.ones_like(keep)

    if not deterministic:
        wrong = markov_speculative(P, Q, k, n, length, rule=keep_all)
        counts = np.bincount(np.ravel_multi_index(wrong.T, (V,) * length), minlength=V**length)
        assert pooled_chisquare(counts, joint_probabilities(P, length)).pvalue < 1e-6


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(0.7),
        SamplingParams(1.0, top_p=0.8),
        SamplingParams(1.3, top_k=5),
        SamplingParams(1.0, min_p=0.1),
        SamplingParams(0.8, top_p=0.9, top_k=6, min_p=0.05),
    ],
    ids=["temperature", "top_p", "top_k", "min_p", "all"],
)
def test_target_distribution_is_what_plain_sampling_draws_from(params):
    """The acceptance rule's p (`RowSampler.distribution`) is the distribution plain
    decoding draws its tokens from (`RowSampler.sample`)."""
    logits = mx.random.normal((1, 12), key=mx.random.key(5)) * 0.7
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    sampler = RowSampler(params)
    p = np.exp(np.array(sampler.distribution(logprobs), np.float64))[0]
    draws = sampler.sample(mx.broadcast_to(logprobs, (4000, 12)))  # 4000 rows, one draw each
    counts = np.bincount(np.array(draws), minlength=12)
    assert np.all(counts[p == 0] == 0) and (p == 0).any() == (params.temperature != 0.7)
    assert pooled_chisquare(counts[p > 0], p[p > 0]).pvalue > 1e-3


def test_sampled_speculative_generation_is_seeded_and_valid():
    model, tokenizer = tiny("hybrid_nope")
    options = {"max_tokens": 12, "temperature": 0.9, "top_k": 50, "seed": 3}
    options["num_draft_tokens"] = 3
    a = tokens_of(stream_generate(model, tokenizer, PROMPT, draft_model=other_model(), **options))
    b = tokens_of(stream_generate(model, tokenizer, PROMPT, draft_model=other_model(), **options))
    c = tokens_of(stream_generate(model, tokenizer, PROMPT, prompt_lookup=3, **options))
    assert a == b and len(a) == 12 and len(c) == 12
    assert all(0 <= t < 512 for t in a + c)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def test_draft_with_another_vocabulary_is_refused():
    model, tokenizer = tiny("hybrid_nope")
    big, _ = real_vocab()
    with pytest.raises(DraftError, match="vocabulary has 100352 entries and the target's 512"):
        list(stream_generate(model, tokenizer, PROMPT, draft_model=big))
    assert issubclass(DraftError, GraniteError)
    with pytest.raises(DraftError, match="vocabulary"):  # straight to the engine, too
        from granite_mlx.engine import Request

        Request(PROMPT, drafter=DraftModel(big)).check(model)


def test_draft_with_another_tokenizer_is_refused():
    model, tokenizer = real_vocab()

    class Renamed:  # same size, one token spelled differently
        def get_vocab(self):
            items = list(tokenizer._tokenizer.get_vocab().items())
            items[0] = ("<renamed>", items[0][1])
            return dict(items)

    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(tokenizer)
    DraftModel(model, tokenizer).check(model, tokenizer)  # the same tokenizer passes
    with pytest.raises(DraftError, match="tokenizer differs"):
        DraftModel(model, Renamed()).check(model, tokenizer)
    with pytest.raises(DraftError, match="tokenizer differs"):
        list(stream_generate(model, tokenizer, "Hi", draft_model=(model, Renamed())))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"draft_model": "self", "num_draft_tokens": 0}, "num_draft_tokens must be"),
        ({"draft_model": "self", "num_draft_tokens": 65}, "num_draft_tokens must be"),
        ({"prompt_lookup": -2}, "prompt_lookup is the number"),
        ({"draft_model": "self", "prompt_lookup": 3}, "not both"),
        ({"draft_model": 42}, "draft_model must be"),
        ({"draft_model": "/nonexistent/draft"}, "No model folder"),
    ],
)
def test_bad_speculative_options_raise_at_the_call(options, message):
    model, tokenizer = tiny("hybrid_nope")
    if options.get("draft_model") == "self":
        options = {**options, "draft_model": model}
    with pytest.raises(GraniteError, match=message):
        stream_generate(model, tokenizer, PROMPT, **options)


def test_make_drafter_forms():
    model, _ = tiny("hybrid_nope")
    assert make_drafter() is None and make_drafter(prompt_lookup=0) is None
    assert isinstance(make_drafter(prompt_lookup=2), PromptLookup)
    assert make_drafter(model).model is model
    assert make_drafter((model, None)).model is model
    lookup = PromptLookup()
    assert make_drafter(lookup) is lookup


def test_prompt_lookup_proposes_the_latest_continuation():
    pl = PromptLookup(max_ngram=2)
    greedy = RowSampler(SamplingParams())
    assert pl.propose([1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3, greedy).tokens.tolist() == [4, 7, 1]
    assert pl.propose([1, 2, 3, 9, 1, 2, 4, 7, 1, 2, 4], 2, greedy).tokens.tolist() == [7, 1]
    assert pl.propose([5, 6], 3, greedy).tokens.tolist() == []  # no earlier occurrence
    assert pl.propose([8, 8, 8], 4, greedy).tokens.tolist() == [8]  # overlapping match
    with pytest.raises(DraftError):
        PromptLookup(max_ngram=1, min_ngram=2)


def test_cache_snapshot_kinds_unchanged():
    # The additive record fields do not leak into snapshots or saved arrays.
    model = load_model(checkpoint("hybrid_nope"))
    c = model.make_cache()
    record(c)
    model(ref_tokens()[:1, :5], c)
    snap = snapshot(c)
    assert all(isinstance(s, int) for s, x in zip(snap.layers, c) if isinstance(x, KVCache))
    assert all(set(x.arrays) <= {"conv_state", "ssm_state"} for x in c if isinstance(x, MambaCache))


# --------------------------------------------------------------------------
# In the engine: drafting rows beside the batch
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["hybrid_nope", "moe_hybrid"])
def test_engine_drafting_rows_beside_a_batch_answer_as_the_plain_model(case):
    from test_engine import prompts, reference, run, tokens

    from granite_mlx.engine import Engine, Request

    model, tokenizer = tiny(case)
    ps = prompts(case)
    lengths = [9, 4, 12, 6, 8, 5]
    plan = {0: [Request(ps[0], max_tokens=lengths[0], drafter=DraftModel(model)),
                Request(ps[1], max_tokens=lengths[1])],
            2: [Request(ps[2], max_tokens=lengths[2], drafter=PromptLookup(), num_draft_tokens=3)],
            3: [Request(ps[3], max_tokens=lengths[3], drafter=DraftModel(other_model()),
                        num_draft_tokens=2)],
            7: [Request(ps[4], max_tokens=lengths[4], drafter=DraftModel(model))],  # 1-token prompt
            9: [Request(ps[5], max_tokens=lengths[5])]}  # fmt: skip
    got = run(Engine(model, tokenizer, max_batch=4, prefill_step_size=5), plan)
    for i, p in enumerate(ps):
        assert tokens(got[i]) == reference(model, p, lengths[i]), f"row {i}"
        assert [r.finish_reason for r in got[i]] == [None] * (lengths[i] - 1) + ["length"]
    assert got[0][-1].accepted_tokens == got[0][-1].drafted_tokens > 0
    assert got[1][-1].drafted_tokens == 0


def test_engine_processors_and_top_logprobs_with_a_drafter_match_plain():
    """The repetition penalty sees, at every verified position, the history plain
    decoding would; top logprobs are the target's at each emitted position."""
    from test_engine import run

    from granite_mlx.engine import Engine, Request

    model, tokenizer = tiny("hybrid_nope")
    penalty = SamplingParams(repetition_penalty=1.5, repetition_context_size=6)
    plain = run(Engine(model, tokenizer), {0: [
        Request(PROMPT, max_tokens=16, sampling=penalty, top_logprobs=3)
    ]})[0]  # fmt: skip
    for drafter in (DraftModel(model), PromptLookup(), DraftModel(other_model())):
        spec = run(Engine(model, tokenizer), {0: [
            Request(PROMPT, max_tokens=16, sampling=penalty, top_logprobs=3, drafter=drafter,
                    num_draft_tokens=4)
        ]})[0]  # fmt: skip
        assert tokens_of(spec) == tokens_of(plain)
        for a, b in zip(spec, plain):
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
            np.testing.assert_allclose(
                [v for _, v in a.top_logprobs], [v for _, v in b.top_logprobs], atol=1e-4
            )
            assert abs(a.logprob - b.logprob) < 1e-4


def test_engine_abort_and_callers_cache_with_a_drafter():
    from test_engine import reference, run, tokens

    from granite_mlx.engine import Engine, Request

    model, tokenizer = tiny("hybrid_nope")
    engine = Engine(model, tokenizer)
    a = engine.add(Request(PROMPT, max_tokens=40, drafter=DraftModel(model)))
    out = []
    while engine.has_work:
        for _, r in engine.step():
            out.append(r)
        if len(out) >= 5:
            engine.abort(a)
    assert out[-1].finish_reason == "cancelled" and out[-1].token is None
    # The caller's cache ends holding a prefix of prompt + answer, and continues exactly.
    cache = model.make_cache()
    got = run(Engine(model, tokenizer), {0: [
        Request(PROMPT, max_tokens=7, cache=cache, drafter=DraftModel(model), num_draft_tokens=8)
    ]})[0]  # fmt: skip
    ids = PROMPT + tokens(got)
    held = cache_length(cache)
    assert held == len(ids) - 1
    nxt = run(Engine(model, tokenizer), {0: [Request([7, 8], cache=cache, max_tokens=4)]})
    assert tokens(nxt[0]) == reference(model, ids[:held] + [7, 8], 4)


def test_engine_thread_runs_a_drafting_request():
    from granite_mlx.engine import EngineThread, Request

    model, tokenizer = tiny("hybrid_nope")
    plain = tokens_of(stream_generate(model, tokenizer, PROMPT, max_tokens=10))
    thread = EngineThread(model, tokenizer)
    try:
        stream = thread.submit(Request(PROMPT, max_tokens=10, drafter=PromptLookup()))
        assert tokens_of(stream) == plain
        with pytest.raises(DraftError, match="vocabulary"):
            thread.submit(Request(PROMPT, drafter=DraftModel(real_vocab()[0])))
    finally:
        thread.shutdown()


def test_engine_refuses_a_drafter_with_a_constraint_or_of_the_wrong_type():
    from granite_mlx.engine import Engine, Request

    model, tokenizer = tiny("hybrid_nope")
    engine = Engine(model, tokenizer)

    class Anything:
        def mask(self):
            return np.ones(512, np.bool_)

        def advance(self, token):
            pass

        def is_finished(self):
            return False

    with pytest.raises(GraniteError, match="cannot be combined with a constraint"):
        engine.add(Request(PROMPT, drafter=PromptLookup(), constraint=Anything()))
    with pytest.raises(GraniteError, match="must be a granite_mlx.speculative.Drafter"):
        engine.add(Request(PROMPT, drafter=model))
    with pytest.raises(DraftError, match="num_draft_tokens"):
        engine.add(Request(PROMPT, drafter=PromptLookup(), num_draft_tokens=0))
    assert not engine.has_work


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


def test_cli_generate_with_a_draft_model_or_prompt_lookup(capsys):
    from test_cli import run
    from test_generate import real_vocab_folder, tiny_folder

    from granite_mlx import generate

    folder = str(real_vocab_folder())
    base = ["generate", "--model", folder, "--prompt", "Hello", "--max-tokens", "8",
            "--dtype", "float32"]  # fmt: skip
    model, tokenizer = real_vocab()
    expected = generate(model, tokenizer, [{"role": "user", "content": "Hello"}], max_tokens=8)
    code, out, err = run(capsys, *base, "--draft-model", folder, "--num-draft-tokens", "3")
    assert code == 0 and out == expected + "\n"
    assert "drafted: " in err and "accepted: " in err
    code, out, err = run(capsys, *base, "--prompt-lookup", "4")
    assert code == 0 and out == expected + "\n" and "drafted: " in err
    # Bad input: one line each, exit 1.
    for extra, message in (
        (["--draft-model", str(tiny_folder("hybrid_nope"))], "vocabulary has 512 entries"),
        (["--prompt-lookup", "-1"], "prompt_lookup is the number"),
        (["--draft-model", folder, "--prompt-lookup", "2"], "not both"),
        (["--draft-model", folder, "--num-draft-tokens", "0"], "num_draft_tokens must be"),
    ):
        code, out, err = run(capsys, *base, *extra)
        assert code == 1 and out == "" and message in err and err.count("\n") == 1, extra


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


def test_serve_drafts_for_its_requests_and_answers_as_the_library():
    import openai
    from serve_helpers import MODEL_ID, LiveServer

    from granite_mlx.speculative import drafter_factory

    live = LiveServer(max_batch=2)
    try:
        model, tokenizer = live.service.model, live.service.tokenizer
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Repeat: the cat sat on the mat, the cat sat"}]
        want = generate_text(messages, max_tokens=12)
        for options in ({"prompt_lookup": 3}, {"draft_model": (model, tokenizer),
                                                "num_draft_tokens": 2}):  # fmt: skip
            # What `granite-mlx serve --prompt-lookup 3` / `--draft-model M` set up.
            live.service.translator.drafting = drafter_factory(model, tokenizer, options)
            answer = client.chat.completions.create(
                model=MODEL_ID, messages=messages, max_tokens=12, temperature=0
            )
            assert answer.choices[0].message.content == want
            assert live.engine.requests[-1].drafter is not None
        # Structured output cannot draft: such a request runs without a drafter.
        client.chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=4,
            response_format={"type": "json_object"},
        )  # fmt: skip
        assert live.engine.requests[-1].drafter is None
    finally:
        live.stop()


def generate_text(messages, **options) -> str:
    from granite_mlx import generate

    model, tokenizer = real_vocab()
    return generate(model, tokenizer, messages, **options)


def test_serve_flags_bad_input_is_one_line(capsys):
    from granite_mlx.serve.cli import main
    from test_generate import real_vocab_folder, tiny_folder

    base = ["--model", str(real_vocab_folder()), "--port", "0", "--dtype", "float32"]
    for extra, message in (
        (["--prompt-lookup", "-1"], "prompt_lookup is the number"),
        (["--draft-model", str(tiny_folder("hybrid_nope"))], "vocabulary has 512 entries"),
    ):
        assert main([*base, *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") <= 2, err  # "Loading ..." then the error


@pytest.mark.parametrize("kept", [0, 1, 3, 5])
def test_a_draft_model_after_a_rejection_drafts_as_a_fresh_one(kept):
    # The target keeps `kept` drafts, then writes its own token: the draft model goes back
    # to a snapshot (or trims), and must then hold exactly what a fresh prefill holds.
    greedy = RowSampler(SamplingParams())
    reused = DraftModel(other_model())
    first = reused.propose(PROMPT, 6, greedy).tokens.tolist()
    own = (first[kept] + 1) % 512  # not the draft at that position: a rejection
    context = [*PROMPT, *first[:kept], own]
    again = reused.propose(context, 6, greedy)
    fresh = DraftModel(other_model()).propose(context, 6, greedy)
    assert again.tokens.tolist() == fresh.tokens.tolist()
    assert reused.ids == context
    reused._sync([*context, 0])  # read the fed drafts back in, as the next call does
    fresh_model = DraftModel(other_model())
    fresh_model.propose(context, 6, greedy)
    fresh_model._sync([*context, 0])
    for a, b in zip(reused.cache, fresh_model.cache):
        assert a.offset == b.offset
        xs, ys = a.arrays, b.arrays
        assert xs.keys() == ys.keys()
        for name in xs:
            assert mx.allclose(xs[name], ys[name], atol=1e-5, rtol=1e-5).item(), name


def test_generate_with_a_draft_model_equals_plain_generate():
    from granite_mlx import generate

    model, tokenizer = tiny("hybrid_nope")
    plain = generate(model, tokenizer, PROMPT, max_tokens=16)
    for draft in (other_model(), model):
        assert generate(model, tokenizer, PROMPT, max_tokens=16, draft_model=draft) == plain
