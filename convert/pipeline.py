"""`convert`: a Granite 4.0 checkpoint -> an MLX one (quantized or not), checked.

1. Load the source (any layout granite-mlx reads), as stored.
2. Record the source's next-token log-probabilities on the quality inputs.
3. Cast (--dtype) and quantize as the recipe says.
4. Write, into a staging folder: shards in mlx-lm's layout, config.json (Hub
   spellings + mlx-lm's `quantization` block), tokenizer files, generation config.
5. Load what was written, compare it with step 2 (quality.json, --max-kl), write
   the model card, then move the folder into place.
6. Optionally upload it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm.auto import tqdm

from granite_mlx.config import ModelArgs
from granite_mlx.errors import GraniteError
from granite_mlx.loading import (
    cast_weights,
    check_weights,
    load_config,
    load_model,
    parse_dtype,
    quantization_of,
    resolve_model_path,
    weight_files,
)
from granite_mlx.model import Model
from granite_mlx.safetensors_check import check_safetensors
from granite_mlx.weights import FLOAT32_PARAMS, sanitize, to_mlx_lm_layout

from .card import DEFAULT_LICENSE, hub_repo_of, model_card, source_license
from .errors import ConvertError, QualityError
from .quality import QualityReport, compute_dtype, log_probs, measure, quality_inputs
from .recipe import (
    BITS,
    GROUP_SIZES,
    RECIPES,
    apply_plan,
    describe_plan,
    plan_quantization,
    quantization_block,
    recipe_bits,
    summarize_plan,
)
from .upload import HubClient, UploadPlan, check_repo_id, upload
from .writer import (
    MAX_SHARD_BYTES,
    check_target,
    copy_side_files,
    human_size,
    recover_output,
    save_shards,
    staged_output,
    write_json,
)

DEFAULT_BITS = 4  # the command line's default: the converter exists to make 4-bit models
DEFAULT_GROUP_SIZE = 64
DEFAULT_RECIPE = "granite"
# Source config keys that would contradict what we write.
_DROP_KEYS = {"layers_block_type", "dtype", "quantization", "quantization_config", "_name_or_path"}


@dataclass
class ConvertResult:
    out: Path
    quantization: str  # e.g. "4-bit, group size 64, granite recipe" or "unquantized bfloat16"
    size_bytes: int  # the weight files written
    source_bytes: int
    quality: QualityReport | None
    seconds: float
    peak_memory_bytes: int  # mx.get_peak_memory() over the conversion
    phase_seconds: dict[str, float]  # load, quality: source, quantize, write, quality: converted
    upload: UploadPlan | None = None


class _Laps:
    """Seconds spent in each phase of a conversion."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self._last
        self._last = now


def check_options(
    *,
    q_bits: int | None,
    q_group_size: int | None,
    recipe: str | None,
    dtype: str | None,
    max_kl: float | None,
    upload_repo: str | None,
    dry_run: bool,
    check_quality: bool,
    max_shard_bytes: int,
) -> None:
    """Refuse option combinations that make no sense, before any work is done."""
    if q_bits is not None and q_bits not in BITS:
        raise ConvertError(f"--q-bits {q_bits} is not supported; use 4 or 8.")
    if q_group_size is not None and q_group_size not in GROUP_SIZES:
        raise ConvertError(f"--q-group-size {q_group_size} is not supported; use 32, 64 or 128.")
    if recipe is not None and recipe not in RECIPES:
        raise ConvertError(f"--recipe {recipe!r} is unknown; use one of {', '.join(RECIPES)}.")
    if q_bits is None and (q_group_size is not None or recipe is not None):
        raise ConvertError(
            "--q-group-size and --recipe only apply to quantized output; add --q-bits 4 or 8."
        )
    if dtype is not None:
        try:
            parse_dtype(dtype)
        except GraniteError:
            raise ConvertError(
                f"--dtype {dtype!r} is not supported; use bfloat16, float16 or float32."
            ) from None
    if max_kl is not None and not max_kl >= 0:
        raise ConvertError(f"--max-kl must be a number >= 0, found {max_kl}.")
    if max_kl is not None and not check_quality:
        raise ConvertError("--max-kl needs the quality check; drop --skip-quality.")
    if dry_run and not upload_repo:
        raise ConvertError(
            "--dry-run lists what --upload-repo would upload; add --upload-repo NAME."
        )
    if upload_repo is not None:
        check_repo_id(upload_repo)
    if max_shard_bytes <= 0:
        raise ConvertError("The shard size limit must be positive.")


def _check_paths(folder: Path, out: Path, force: bool) -> None:
    src, dst = folder.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ConvertError(
            f"The output folder {out} holds the source model; choose an output folder outside it."
        )
    check_target(out, force)


def _read_source(folder: Path, args: ModelArgs, progress: bool) -> tuple[dict[str, mx.array], int]:
    """The source's weights in our layout, as stored (SSM params in float32), and its bytes."""
    weights: dict[str, mx.array] = {}
    files = weight_files(folder)
    for path in tqdm(files, desc="loading", unit="file", disable=not progress):
        check_safetensors(path)
        try:
            weights.update(mx.load(str(path)))
        except (RuntimeError, ValueError, OSError) as e:  # the header was fine, the data not
            raise ConvertError(f"Cannot read {path}: {e}. Download the checkpoint again.") from None
    return cast_weights(sanitize(weights, args), None), sum(p.stat().st_size for p in files)


def _main_dtype(weights: dict[str, mx.array]) -> mx.Dtype:
    """The floating dtype holding most of the weights (the SSM's float32 params aside)."""
    count: dict[mx.Dtype, int] = {}
    for name, w in weights.items():
        if mx.issubdtype(w.dtype, mx.floating) and name.rsplit(".", 1)[-1] not in FLOAT32_PARAMS:
            count[w.dtype] = count.get(w.dtype, 0) + w.nbytes
    return max(count, key=count.get) if count else mx.float32


def _dtype_name(dtype: mx.Dtype) -> str:
    return {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[dtype]


def _quantize(model: Model, plan: dict, progress: bool) -> None:
    apply_plan(model, plan)
    modules = [m for path, m in model.named_modules() if plan.get(path)]
    # Quantization is lazy: evaluate module by module so the bar shows real work.
    for module in tqdm(modules, desc="quantizing", unit="module", disable=not progress):
        mx.eval(module.parameters())


def output_config(
    source: dict[str, Any], args: ModelArgs, dtype: mx.Dtype, quantization: dict[str, Any] | None
) -> dict[str, Any]:
    """config.json: the source's keys, our normalised ones (layer kinds spelled
    "mamba"/"attention"), the real dtype and mlx-lm's quantization block."""
    config = {k: v for k, v in source.items() if k not in _DROP_KEYS}
    config.update(args.to_hub_dict())
    # Written even when (0, inf): mlx-lm's default otherwise clamps dt to (0.001, 100).
    config["time_step_limit"] = [float(x) for x in args.time_step_limit]
    config["torch_dtype"] = _dtype_name(dtype)
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization  # where Hub tooling looks for it
    return config


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    recipe: str | None = None,
    dtype: str | None = None,
    max_kl: float | None = None,
    force: bool = False,
    upload_repo: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    base_model: str | None = None,
    license: str | None = None,  # noqa: A002 - the model card's word for it
    max_shard_bytes: int = MAX_SHARD_BYTES,
    check_quality: bool = True,
    client: HubClient | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ConvertResult:
    """Convert the Granite 4.0 checkpoint `src` (folder or Hub repo id) into `out`.

    q_bits: 4 or 8 to quantize (q_group_size 32/64/128, default 64; recipe
        "granite" (default), "uniform" or "mixed"); None for unquantized output.
    dtype: "bfloat16", "float16" or "float32" for the unquantized tensors (all
        of them when not quantizing); None keeps the source's.
    max_kl: fail (leaving nothing at `out`) when the mean per-token KL
        divergence against the source is larger.
    force: replace an existing `out` (only once the new one is complete).
    upload_repo: upload the result there; dry_run lists the files instead.
    base_model: the Hub repo of the original, for the card (inferred when `src`
        is a repo id or a Hub cache path).
    license: the card's license id (default: the source card's, else apache-2.0).
    max_shard_bytes: size limit of one safetensors file (default 5 GB).
    client: the Hub client for the upload (default huggingface_hub.HfApi()).

    Raises GraniteError subclasses for every problem a user can fix.
    """
    start = time.perf_counter()
    mx.reset_peak_memory()
    check_options(
        q_bits=q_bits,
        q_group_size=q_group_size,
        recipe=recipe,
        dtype=dtype,
        max_kl=max_kl,
        upload_repo=upload_repo,
        dry_run=dry_run,
        check_quality=check_quality,
        max_shard_bytes=max_shard_bytes,
    )
    out = Path(out).expanduser()
    if (restored := recover_output(out)) is not None:
        log(f"Restored {restored}: an earlier conversion was killed while replacing it.")
    if Path(src).expanduser().is_dir():
        _check_paths(Path(src).expanduser(), out, force)
    check_target(out, force)  # fail fast, before a download
    folder = resolve_model_path(src)
    _check_paths(folder, out, force)
    source_config = load_config(folder)
    args = ModelArgs.from_dict(source_config)
    if (q := quantization_of(source_config)) is not None:
        raise ConvertError(
            f"{folder} is already quantized ({q['bits']}-bit); convert from the original "
            "(bf16) checkpoint instead."
        )

    laps = _Laps()
    weights, source_bytes = _read_source(folder, args, progress)
    model = Model(args)
    check_weights(model, weights, folder)
    model.load_weights(list(weights.items()))
    model.eval()
    laps("load")

    reference = inputs = None
    compute = compute_dtype() if check_quality else None
    if check_quality:
        inputs = quality_inputs(folder, args.vocab_size)
        if compute is not None:
            model.set_dtype(compute)
        reference = log_probs(model, inputs.sequences, "quality: source", progress)
        laps("quality: source")

    out_dtype = parse_dtype(dtype) or _main_dtype(weights)
    if dtype is not None or compute is not None:
        model.load_weights(list(cast_weights(weights, parse_dtype(dtype)).items()))
    del weights
    quant_block, recipe_rows = None, None
    if q_bits is not None:
        group = q_group_size or DEFAULT_GROUP_SIZE
        recipe = recipe or DEFAULT_RECIPE
        plan = plan_quantization(model, recipe_bits(recipe, q_bits, args), group)
        _quantize(model, plan, progress)
        quant_block = quantization_block(plan, args, q_bits, group)
        recipe_rows = summarize_plan(plan)
        description = describe_plan(plan, q_bits, group, recipe)
        laps("quantize")
    else:
        description = f"unquantized {_dtype_name(out_dtype)}"
    config = output_config(source_config, args, out_dtype, quant_block)
    out_weights = to_mlx_lm_layout(dict(tree_flatten(model.parameters())), args)
    del model

    report = None
    with staged_output(out, force) as stage:
        shards = save_shards(out_weights, stage, max_shard_bytes, progress)
        del out_weights
        write_json(stage / "config.json", config)
        copy_side_files(folder, stage, config)
        laps("write")
        if check_quality:
            log(f"Quality against the source ({inputs.note}):")
            compute_name = _dtype_name(compute) if compute is not None else None
            converted = load_model(stage, dtype=compute_name)
            report = measure(
                reference, converted, inputs, compute_name or "as stored", progress, log
            )
            del converted
            write_json(stage / "quality.json", {"quantization": description, **report.to_dict()})
            laps("quality: converted")
            if max_kl is not None and report.mean_kl > max_kl:
                raise QualityError(
                    f"The converted model's mean KL divergence {report.mean_kl:.5f} is above "
                    f"--max-kl {max_kl:g}, so nothing was written to {out}. Use more bits "
                    "(--q-bits 8), a smaller --q-group-size or --recipe mixed, or raise --max-kl."
                )
        size = sum((stage / s).stat().st_size for s in shards)
        card = model_card(
            repo_id=upload_repo,
            local_path=str(out),
            base_model=base_model or hub_repo_of(str(src), folder),
            license=license or source_license(folder) or DEFAULT_LICENSE,
            quantization=description,
            recipe_rows=recipe_rows,
            quality=report,
            size_bytes=size,
            source_bytes=source_bytes,
        )
        (stage / "README.md").write_text(card, encoding="utf-8")

    result = ConvertResult(
        out=out,
        quantization=description,
        size_bytes=size,
        source_bytes=source_bytes,
        quality=report,
        seconds=time.perf_counter() - start,
        peak_memory_bytes=mx.get_peak_memory(),
        phase_seconds=laps.seconds,
    )
    log(
        f"Wrote {out} ({description}): {human_size(size)} of weights, "
        f"{size / source_bytes:.1%} of the source, in {result.seconds:.1f} s "
        f"(peak MLX memory {human_size(result.peak_memory_bytes)})."
    )
    if upload_repo is not None:
        result.upload = upload(
            out, upload_repo, client=client, private=private, dry_run=dry_run, log=log
        )
    return result
