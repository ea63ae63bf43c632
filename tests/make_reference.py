"""Write the golden reference fixtures from transformers (run by hand, not by pytest).

Command (from the repository root; needs torch and transformers 5.x, CPU is fine):

    python tests/make_reference.py

It takes well under a minute and rewrites

    tests/fixtures/checkpoints/<case>/transformers/   what GraniteMoeHybridForCausalLM.save_pretrained
                                                      writes (float32, transformers-5 config spellings)
    tests/fixtures/checkpoints/<case>/hub/            the same weights, config spelled as IBM's Hub
                                                      checkpoints are (see HUB_DTYPE for the dtype)
    tests/fixtures/reference/<case>.safetensors       input_ids (int32, [2, 37]), logits_f32 and
                                                      logits_bf16 (float32, [2, 37, vocab])
    tests/fixtures/reference/generation.json          greedy continuations, for each case and for the
                                                      real-vocabulary model (config + seed only)

The tiny cases are built by transformers itself (the model object, its config
handling, its save_pretrained); their weights are re-drawn with torch at the
scales checkpoint_factory documents (norms and the Mamba2 A_log / D / dt_bias /
conv bias included, which transformers sets to constants) and every weight is
rounded to a bfloat16-representable float32 value.
So the float32 and the bfloat16 copies of a checkpoint hold exactly the same
numbers, ``logits_f32`` is the reference for both, and ``logits_bf16`` (the
same model run by transformers in bfloat16) measures only transformers' own
bfloat16 activation error, which is the yardstick for a bfloat16 tolerance.

The ``real_vocab`` model is made by ``checkpoint_factory.write_checkpoint``
(numpy only, deterministic), so only its config, seed and the token ids are
committed; the suite regenerates the weights.

Greedy continuations are computed in float32 without a cache (a full forward
per token, the plain definition; the same as ``generate(use_cache=False)``) and
compared with ``model.generate`` using its cache. They agree everywhere except
``dt_limit``: transformers 5.23's single-token Mamba2 step
(``mamba2_selective_state_update``) ignores ``time_step_limit`` while its prefill
clamps, so its cached generate drifts; the record keeps the clamped (no-cache)
ids and also lists the cached ones. Prompts for the tiny cases are random
candidates; among those whose continuation is varied (no single-token
attractor) the one with the largest smallest top-1 minus top-2 logit margin is
kept. Every recorded margin is > 1e-3, so the tests are not flaky.

HUB_DTYPE is float32 because the suite loads hub/ in the checkpoint's dtype and
compares with ``logits_f32``; bfloat16 (as IBM ships) would halve those files
and hold exactly the same values.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import checkpoint_factory as factory

FIXTURES = HERE / "fixtures"
CHECKPOINTS = FIXTURES / "checkpoints"
REFERENCE = FIXTURES / "reference"
TOKENIZER = FIXTURES / "tokenizer"  # the real Granite 4.0 tokenizer (a committed copy)

TINY_CASES = ["hybrid_nope", "dense_rope_untied", "moe_hybrid", "groups2", "dt_limit"]
CASE_SEEDS = {name: 100 + i for i, name in enumerate(TINY_CASES)}
REDUNDANT_LM_HEAD = {"hybrid_nope"}  # tied, but the hub copy ships lm_head.weight
HUB_DTYPE = torch.float32  # see the module docstring
SEQ_LEN = 37  # not a multiple of any case's mamba_chunk_size (16)
BATCH = 2
TINY_PROMPT_LEN = 19  # longer than one chunk, so prefill spans chunks before decoding
TINY_NEW_TOKENS = 12
TINY_PROMPT_CANDIDATES = 32
TINY_MIN_DISTINCT = 8  # distinct tokens among the 12 generated: no "the the the" attractor
MOE_INPUT_CANDIDATES = 64
REAL_SEED = 1234
REAL_NEW_TOKENS = 16
MIN_MARGIN = 1e-3

torch.set_grad_enabled(False)


# --------------------------------------------------------------------------
# Building the tiny models
# --------------------------------------------------------------------------


def hub_config(case: str) -> dict:
    config = factory.config_for(case)
    config["torch_dtype"] = str(HUB_DTYPE).removeprefix("torch.")
    return config


def transformers_config(hub: dict) -> GraniteMoeHybridConfig:
    """Let transformers itself read the Hub spelling (as from_pretrained would)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hub))
        config = GraniteMoeHybridConfig.from_pretrained(tmp)
    config._attn_implementation = "eager"
    return config


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def log_uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    t = torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.exp(math.log(low) + t * (math.log(high) - math.log(low)))


RESIDUAL_WRITERS = ("o_proj.weight", "out_proj.weight", "output_linear.weight", "experts.down_proj")


def randomize(model: GraniteMoeHybridForCausalLM, case: str, gen: torch.Generator) -> None:
    """Re-draw transformers' initial weights with the scales checkpoint_factory
    uses (see its docstring), and move the parameters transformers sets to
    constants (norm weights 1, D 1, dt_bias 1, conv bias 0, A_log log(1..n))
    to random values, so that a bug in any of them shows in the logits."""
    # dt_limit: many softplus(dt + dt_bias) values above 0.05, so the clamp bites.
    dt_range = (0.02, 0.3) if case == "dt_limit" else (0.001, 0.1)
    # In-memory names: experts.gate_up_proj / down_proj, router.weight.
    for name, p in model.named_parameters():
        n = p.numel()
        if name.endswith("embed_tokens.weight"):
            p.copy_(factory.EMBED_STD * torch.randn(p.shape, generator=gen))
        elif p.dim() >= 2:  # matrices, expert stacks, conv1d [C, 1, K]: std gain / sqrt(fan_in)
            gain = factory.OUT_GAIN if name.endswith(RESIDUAL_WRITERS) else 1.0
            p.copy_(gain / math.sqrt(p.shape[-1]) * torch.randn(p.shape, generator=gen))
        elif name.endswith("norm.weight"):  # all RMSNorms, the gated Mamba one too
            p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=gen))
        elif name.endswith("mamba.A_log"):
            p.copy_(torch.log(1.0 + 15.0 * torch.rand(n, generator=gen)))
        elif name.endswith("mamba.D"):
            p.copy_(0.5 + torch.rand(n, generator=gen))
        elif name.endswith("mamba.dt_bias"):
            p.copy_(inverse_softplus(log_uniform(n, *dt_range, gen)))
        elif name.endswith("conv1d.bias"):
            p.copy_(0.2 * torch.rand(n, generator=gen) - 0.1)
        else:
            raise AssertionError(f"unexpected parameter {name}")


def round_to_bfloat16(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).to(p.dtype))


def build_tiny(case: str) -> tuple[GraniteMoeHybridForCausalLM, dict]:
    hub = hub_config(case)
    config = transformers_config(hub)
    torch.manual_seed(CASE_SEEDS[case])
    model = GraniteMoeHybridForCausalLM(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(CASE_SEEDS[case])
    randomize(model, case, gen)
    round_to_bfloat16(model)
    return model, hub


# --------------------------------------------------------------------------
# Writing the checkpoint folders
# --------------------------------------------------------------------------


def write_transformers_folder(model, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)


def write_hub_folder(case: str, hub: dict, transformers_folder: Path, folder: Path) -> None:
    """Same tensors as save_pretrained wrote (its names already are the Hub
    names), in HUB_DTYPE, next to the Hub-spelled config."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tensors = load_file(transformers_folder / "model.safetensors")
    if case in REDUNDANT_LM_HEAD:
        assert "lm_head.weight" not in tensors
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors = {k: v.to(HUB_DTYPE).contiguous() for k, v in sorted(tensors.items())}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hub, indent=2) + "\n")
    generation = {
        "_from_model_config": True,
        "bos_token_id": hub["bos_token_id"],
        "eos_token_id": hub["eos_token_id"],
        "pad_token_id": hub["pad_token_id"],
        "transformers_version": hub["transformers_version"],
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# --------------------------------------------------------------------------
# Logits
# --------------------------------------------------------------------------


def random_ids(seed: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (BATCH, SEQ_LEN), generator=gen)


def routing(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(router logits, chosen experts) of every MoE layer for one forward."""
    captured = []
    hooks = [
        layer.block_sparse_moe.router.register_forward_hook(
            lambda mod, args, out: captured.append((out[0], out[2]))
        )
        for layer in model.model.layers
    ]
    model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return captured


def router_min_gap(model, ids: torch.Tensor) -> float:
    """Smallest float32 gap between the k-th and (k+1)-th router logit."""
    k = model.config.num_experts_per_tok
    gaps = []
    for logits, _ in routing(model, ids):
        top = torch.topk(logits.float(), k + 1, dim=-1).values
        gaps.append((top[:, k - 1] - top[:, k]).min())
    return float(min(gaps))


def bf16_routing_flips(model, bf16_model, ids: torch.Tensor) -> int:
    """Tokens (summed over layers) whose expert set differs between float32 and bfloat16."""
    flips = 0
    for (_, e32), (_, e16) in zip(routing(model, ids), routing(bf16_model, ids)):
        flips += int((e32.sort(-1).values != e16.sort(-1).values).any(-1).sum())
    return flips


def input_ids_for(case: str, model, vocab: int) -> tuple[torch.Tensor, dict]:
    """Random ids; for MoE, the candidate whose routing is furthest from a tie
    (among those where transformers' bf16 run picks the same experts), since a
    near-tie flips experts under bf16 rounding and makes bf16 logits jump."""
    base = 1000 + 100 * CASE_SEEDS[case]
    if not model.config.num_local_experts:
        return random_ids(base, vocab), {}
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    best = None
    for i in range(MOE_INPUT_CANDIDATES):
        ids = random_ids(base + i, vocab)
        if bf16_routing_flips(model, bf16_model, ids):
            continue
        gap = router_min_gap(model, ids)
        if best is None or gap > best[1]:
            best = (ids, gap)
    assert best is not None, case
    return best[0], {"router_min_gap_f32": f"{best[1]:.4g}", "bf16_routing_flips": "0"}


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def write_reference(case: str, model, ids: torch.Tensor, extra_metadata: dict) -> dict:
    f32 = logits_of(model, ids)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16 = logits_of(bf16_model, ids)
    tensors = {
        "input_ids": ids.to(torch.int32).contiguous(),
        "logits_f32": f32.contiguous(),
        "logits_bf16": bf16.contiguous(),
    }
    about = {
        "case": case,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        **extra_metadata,
    }
    # One key: safetensors writes metadata in hash order, so several keys would
    # make the file's bytes change from run to run.
    metadata = {"reference": json.dumps(about, sort_keys=True)}
    save_file(tensors, REFERENCE / f"{case}.safetensors", metadata=metadata)
    return {"f32": f32, "bf16_err": float((bf16 - f32).abs().max()), "logit_std": float(f32.std())}


def check_reload(folder: Path, ids: torch.Tensor, expected: torch.Tensor) -> float:
    """Load a written folder back with transformers (float32) and compare."""
    model = GraniteMoeHybridForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    return float((logits_of(model.eval(), ids) - expected).abs().max())


# --------------------------------------------------------------------------
# Greedy generation
# --------------------------------------------------------------------------


def margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits.float(), 2, dim=-1).values
    return float(top[..., 0] - top[..., 1])


def greedy_no_cache(model, prompt: list[int], n_new: int) -> tuple[list[int], float]:
    """Greedy decoding by a full forward per step; returns new ids and min margin."""
    ids = torch.tensor([prompt])
    new, margins = [], []
    for _ in range(n_new):
        last = model(input_ids=ids).logits[0, -1]
        margins.append(margin(last))
        token = int(torch.argmax(last))
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new, min(margins)


def greedy_generate(model, prompt: list[int], n_new: int) -> tuple[list[int], float]:
    """transformers' own generate (greedy, with its cache)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n_new,
        min_new_tokens=0,
        eos_token_id=None,  # never stop early; callers check eos is not produced
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, len(prompt) :].tolist()
    return new, min(margin(step[0]) for step in out.logits)


def generation_record(model, prompt: list[int], n_new: int, eos: int) -> dict:
    new, min_margin = greedy_no_cache(model, prompt, n_new)
    cached, cached_margin = greedy_generate(model, prompt, n_new)
    bf16_new, _ = greedy_no_cache(copy.deepcopy(model).to(torch.bfloat16), prompt, n_new)
    record = {
        "prompt_ids": prompt,
        "new_ids": new,
        "output_ids": prompt + new,
        "min_margin": round(min_margin, 6),
        "eos_in_output": eos in new,
        "generate_with_cache_agrees": cached == new,
        "bf16_greedy_agrees": bf16_new == new,
    }
    if cached != new:
        record["generate_with_cache_new_ids"] = cached
        record["generate_with_cache_min_margin"] = round(cached_margin, 6)
    return record


def pick_tiny_prompt(case: str, model, vocab: int, eos: int) -> dict:
    """Among a few random prompts whose continuation is varied (at least
    TINY_MIN_DISTINCT distinct tokens), the one with the largest min margin."""
    gen = torch.Generator().manual_seed(2000 + CASE_SEEDS[case])
    best = None
    for _ in range(TINY_PROMPT_CANDIDATES):
        prompt = torch.randint(2, vocab, (TINY_PROMPT_LEN,), generator=gen).tolist()
        new, min_margin = greedy_no_cache(model, prompt, TINY_NEW_TOKENS)
        if eos in new or len(set(new)) < TINY_MIN_DISTINCT:
            continue
        if best is None or min_margin > best[1]:
            best = (prompt, min_margin)
    assert best is not None and best[1] > MIN_MARGIN, (case, best)
    record = generation_record(model, best[0], TINY_NEW_TOKENS, eos)
    assert not record["eos_in_output"] and record["min_margin"] > MIN_MARGIN
    return record


def real_vocab_prompts() -> list[tuple[str, str]]:
    """(label, text) for the real-tokenizer prompts."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return [("plain", "Hello, world!"), ("chat", chat), ("multilingual", "Grüß Gott, 東京 🌸")]


def real_vocab_record() -> dict:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    config = factory.config_for("real_vocab")
    with tempfile.TemporaryDirectory() as tmp:
        factory.write_checkpoint(tmp, config, seed=REAL_SEED)
        model = GraniteMoeHybridForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager"
        )
        model.eval()
        prompts = []
        for label, text in real_vocab_prompts():
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            assert ids == tokenizer.encode(text).ids  # the tokenizer adds no BOS
            record = generation_record(model, ids, REAL_NEW_TOKENS, config["eos_token_id"])
            assert not record["eos_in_output"] and record["min_margin"] > MIN_MARGIN, (
                label,
                record,
            )
            prompts.append({"label": label, "text": text, **record})
    return {
        "config": config,
        "seed": REAL_SEED,
        "dtype": "float32",
        "writer": "checkpoint_factory.write_checkpoint(folder, config, seed)",
        "tokenizer": "tests/fixtures/tokenizer/tokenizer.json (ids from tokenizers.Tokenizer.encode)",
        "max_new_tokens": REAL_NEW_TOKENS,
        "prompts": prompts,
    }


# --------------------------------------------------------------------------
# Diagnostics: show that the features the cases exist for change the logits
# --------------------------------------------------------------------------


def feature_effect(case: str, model, ids: torch.Tensor, f32: torch.Tensor) -> str:
    mambas = [layer.mamba for layer in model.model.layers if layer.mamba is not None]
    if case == "dt_limit":
        saved = [m.time_step_limit for m in mambas]
        for m in mambas:
            m.time_step_limit = (0.0, float("inf"))
        diff = float((logits_of(model, ids) - f32).abs().max())
        for m, limit in zip(mambas, saved):
            m.time_step_limit = limit
        return f"without the dt clamp logits move by {diff:.3g}"
    if case == "groups2":
        saved = [m.norm.group_size for m in mambas]
        for m in mambas:
            m.norm.group_size = m.intermediate_size
        diff = float((logits_of(model, ids) - f32).abs().max())
        for m, size in zip(mambas, saved):
            m.norm.group_size = size
        return f"normalising over all of d_inner instead of per group moves logits by {diff:.3g}"
    return ""


def clamp_fraction(model, ids: torch.Tensor) -> float:
    """Fraction of softplus(dt + dt_bias) values above the time_step_limit max."""
    captured = []
    hooks = [
        layer.mamba.in_proj.register_forward_hook(
            lambda mod, args, out, m=layer.mamba: captured.append((m, out))
        )
        for layer in model.model.layers
        if layer.mamba is not None
    ]
    model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    hits = total = 0
    for m, proj in captured:
        dt = torch.nn.functional.softplus(proj[..., -m.num_heads :] + m.dt_bias)
        hits += int((dt > m.time_step_limit[1]).sum())
        total += dt.numel()
    return hits / total


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main() -> None:
    REFERENCE.mkdir(parents=True, exist_ok=True)
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    generation = {
        "_about": (
            "Greedy (do_sample=False) continuations computed by transformers in float32, "
            "a full forward per token (= generate(use_cache=False)). "
            "new_ids: the generated tokens; output_ids: prompt + new_ids (what generate returns). "
            "min_margin: smallest top-1 minus top-2 logit over the generated steps. "
            "generate_with_cache_agrees: whether generate() with its cache gives the same ids "
            "(not for dt_limit: transformers' single-token Mamba2 step ignores time_step_limit; "
            "its ids are then in generate_with_cache_new_ids). "
            "Tiny cases load from checkpoints/<case>/{hub,transformers}; real_vocab is made by "
            "checkpoint_factory.write_checkpoint(folder, config, seed)."
        ),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "cases": {},
    }
    for case in TINY_CASES:
        model, hub = build_tiny(case)
        folder = CHECKPOINTS / case
        write_transformers_folder(model, folder / "transformers")
        write_hub_folder(case, hub, folder / "transformers", folder / "hub")
        ids, routing_info = input_ids_for(case, model, hub["vocab_size"])
        ref = write_reference(case, model, ids, routing_info)
        reload_t = check_reload(folder / "transformers", ids, ref["f32"])
        reload_h = check_reload(folder / "hub", ids, ref["f32"])
        assert reload_t < 1e-5 and reload_h < 1e-5, (case, reload_t, reload_h)
        record = pick_tiny_prompt(case, model, hub["vocab_size"], hub["eos_token_id"])
        record["eos_token_id"] = hub["eos_token_id"]
        generation["cases"][case] = record
        note = feature_effect(case, model, ids, ref["f32"])
        if case == "dt_limit":
            note += f"; {clamp_fraction(model, ids):.0%} of dt values are clamped"
        print(
            f"{case:18s} logit std {ref['logit_std']:.3f}  bf16 max err {ref['bf16_err']:.3g}  "
            f"reload err transformers {reload_t:.2g} hub {reload_h:.2g}  "
            f"greedy min margin {record['min_margin']:.4f}  cache agrees {record['generate_with_cache_agrees']}  "
            f"bf16 greedy agrees {record['bf16_greedy_agrees']}  {note}"
        )
    generation["real_vocab"] = real_vocab_record()
    for p in generation["real_vocab"]["prompts"]:
        print(
            f"real_vocab/{p['label']:12s} {len(p['prompt_ids'])} prompt ids, min margin {p['min_margin']:.4f}, "
            f"cache agrees {p['generate_with_cache_agrees']}, bf16 greedy agrees {p['bf16_greedy_agrees']}"
        )
    (REFERENCE / "generation.json").write_text(dump_json(generation))


def dump_json(data) -> str:
    """Indented JSON with each list of numbers kept on one line."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    flat = re.sub(
        r"\[\s+([-0-9.,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text
    )
    return flat + "\n"


if __name__ == "__main__":
    main()
