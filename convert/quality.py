"""How far a converted model is from its source, on a fixed set of inputs.

For every input token: the KL divergence KL(source || converted) of the two
next-token distributions, whether the two argmaxes agree, and each model's
negative log-likelihood of the actual next token (perplexity on the text).

Inputs: the fixed multilingual sample in `sample_text.py`, through the
source's tokenizer. When the source has no tokenizer, or its ids do not fit
the model's vocabulary (the tiny test models have 512 entries against the real
tokenizer's 100352), fixed random tokens are used instead and the report says
so: mapping ids modulo the vocabulary would still be called "text" while being
noise to the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
from tqdm.auto import tqdm

from granite_mlx.model import Model

from .sample_text import PASSAGES, SAMPLE_VERSION

RANDOM_SEQUENCES = 4
RANDOM_LENGTH = 64


def compute_dtype() -> mx.Dtype | None:
    """The dtype both models run in for the comparison: float32 on a CPU, where
    MLX's bf16 quantized kernels are about 10x slower than float32 ones; on a
    GPU None (each model as stored: no extra memory). float32 compares the
    weights' error alone, without bf16 rounding of the activations."""
    return mx.float32 if mx.default_device() == mx.cpu else None


@dataclass
class QualityInputs:
    sequences: list[mx.array]  # each (L,) int32
    kind: str  # "text" or "random tokens"
    note: str  # where they came from, and why random when random


@dataclass
class QualityReport:
    inputs: str
    note: str
    compute_dtype: str  # what both models ran in: "float32" or "as stored"
    sequences: int
    tokens: int
    mean_kl: float  # nats per token
    max_kl: float
    top1_agreement: float  # fraction of tokens whose argmax agrees
    ppl_source: float
    ppl_converted: float

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_converted / self.ppl_source

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl_ratio": self.ppl_ratio, "sample_version": SAMPLE_VERSION}

    def table(self) -> str:
        """A Markdown table (readable in a terminal and in the model card)."""
        return "\n".join(
            [
                (
                    "| inputs | tokens | mean KL | max KL | top-1 agreement | ppl source | ppl converted "
                    "| ppl ratio |"
                ),
                "|---|---:|---:|---:|---:|---:|---:|---:|",
                (
                    f"| {self.inputs} | {self.tokens} | {self.mean_kl:.5f} | {self.max_kl:.5f} | "
                    f"{self.top1_agreement:.2%} | {self.ppl_source:.3f} | {self.ppl_converted:.3f} | "
                    f"{self.ppl_ratio:.4f} |"
                ),
            ]
        )


def random_inputs(vocab_size: int, note: str, seed: int = 0) -> QualityInputs:
    tokens = mx.random.randint(
        0, vocab_size, (RANDOM_SEQUENCES, RANDOM_LENGTH), key=mx.random.key(seed)
    )
    return QualityInputs([tokens[i] for i in range(RANDOM_SEQUENCES)], "random tokens", note)


def text_inputs(tokenizer, vocab_size: int) -> QualityInputs:
    """The sample passages through `tokenizer`; random tokens when ids don't fit."""
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in PASSAGES]
    top = max(max(seq) for seq in ids)
    if top >= vocab_size:
        return random_inputs(
            vocab_size,
            f"{RANDOM_SEQUENCES} fixed random sequences of {RANDOM_LENGTH} tokens instead of the "
            f"text sample, since the tokenizer's ids reach {top} but the model's vocabulary has "
            f"{vocab_size} entries",
        )
    note = (
        f"the fixed multilingual text sample (version {SAMPLE_VERSION}, {len(PASSAGES)} passages)"
    )
    return QualityInputs([mx.array(seq, dtype=mx.int32) for seq in ids], "text", note)


def quality_inputs(folder: Path, vocab_size: int) -> QualityInputs:
    """Inputs for a checkpoint folder: its tokenizer on the text sample, if it has one."""
    from granite_mlx.tokenizer import TokenizerError, load_tokenizer

    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        return random_inputs(
            vocab_size,
            f"{RANDOM_SEQUENCES} fixed random sequences of {RANDOM_LENGTH} tokens, since the "
            "source has no tokenizer",
        )
    try:
        tokenizer = load_tokenizer(folder)
    except TokenizerError as e:
        return random_inputs(
            vocab_size,
            f"{RANDOM_SEQUENCES} fixed random sequences of {RANDOM_LENGTH} tokens, since the "
            f"source's tokenizer did not load ({e})",
        )
    return text_inputs(tokenizer, vocab_size)


def log_probs(
    model: Model, sequences: Sequence[mx.array], desc: str = "", progress: bool = True
) -> list[mx.array]:
    """Next-token log-probabilities (L, vocab), float32, one array per sequence."""
    out = []
    for seq in tqdm(sequences, desc=desc, unit="seq", disable=not progress, leave=False):
        logits = model(seq[None])[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(lp)
        out.append(lp)
    return out


def compare(
    reference: Sequence[mx.array],
    converted: Sequence[mx.array],
    inputs: QualityInputs,
    compute_dtype: str = "as stored",
) -> QualityReport:
    """Compare two models' log-probabilities on the same inputs."""
    kls, agree, nll_ref, nll_new = [], [], [], []
    for ref, new, seq in zip(reference, converted, inputs.sequences):
        p = mx.exp(ref)
        kl = mx.sum(mx.where(p > 0, p * (ref - new), 0.0), axis=-1)  # (L,)
        kls.append(mx.maximum(kl, 0.0))  # rounding can give -1e-9
        agree.append(mx.argmax(ref, axis=-1) == mx.argmax(new, axis=-1))
        targets = seq[1:, None]
        nll_ref.append(-mx.take_along_axis(ref[:-1], targets, axis=-1))
        nll_new.append(-mx.take_along_axis(new[:-1], targets, axis=-1))
    kl = mx.concatenate(kls)
    return QualityReport(
        inputs=inputs.kind,
        note=inputs.note,
        compute_dtype=compute_dtype,
        sequences=len(inputs.sequences),
        tokens=kl.size,
        mean_kl=kl.mean().item(),
        max_kl=kl.max().item(),
        top1_agreement=mx.concatenate(agree).astype(mx.float32).mean().item(),
        ppl_source=math.exp(mx.concatenate(nll_ref).mean().item()),
        ppl_converted=math.exp(mx.concatenate(nll_new).mean().item()),
    )


def measure(
    reference: Sequence[mx.array],
    model: Model,
    inputs: QualityInputs,
    compute_dtype: str = "as stored",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> QualityReport:
    """Run `model` on `inputs` and compare it with the reference log-probabilities."""
    converted = log_probs(model, inputs.sequences, "quality: converted", progress)
    report = compare(reference, converted, inputs, compute_dtype)
    if log is not None:
        log(report.table())
    return report
