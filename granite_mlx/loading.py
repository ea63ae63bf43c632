"""`load_model`: a local folder or a Hub repo id -> a ready `Model`.

Reads one or sharded safetensors (with an index), in the Hub, transformers-5 or
mlx-lm layout, quantized (a `quantization` block in config.json, mlx-lm's
format) or not. Every problem with the files is reported in one clear message.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from .config import ModelArgs
from .errors import CheckpointError, ConfigError, ModelNotFoundError
from .model import Model
from .safetensors_check import check_safetensors
from .weights import FLOAT32_PARAMS, mlx_lm_module_paths, sanitize

# What a Granite checkpoint needs from the Hub: config, weights, tokenizer, template.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def resolve_model_path(path_or_repo_id: str | os.PathLike) -> Path:
    """A local folder as is; a Hub repo id downloaded (only the needed files) or
    taken from the local Hub cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; pass the folder that holds config.json.")
        return path
    text = str(path_or_repo_id)
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"No model folder at {path}. Pass an existing folder (with config.json and "
            "*.safetensors) or a Hugging Face repo id such as ibm-granite/granite-4.0-h-350m."
        )
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id} is gated on the Hugging Face Hub: accept its terms on the website and "
            "log in with `hf auth login`, or pass a local folder."
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"The Hugging Face Hub has no repo {repo_id!r} (or it is private). Check the name, "
            "or pass a local folder."
        ) from None
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        # No network and not cached, or the Hub refused: say how to run offline.
        raise ModelNotFoundError(
            f"Could not get {repo_id} from the Hugging Face Hub ({type(e).__name__}) and it is "
            "not in the local cache. Connect to the network once to download it, or pass a "
            "local folder that holds the model (config.json and *.safetensors)."
        ) from None
    except Exception as e:  # huggingface_hub raises many HTTP error types
        raise ModelNotFoundError(
            f"Could not get {repo_id} from the Hugging Face Hub: {e}. Pass a local folder "
            "instead, or try again later."
        ) from None


def load_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json: is it a model folder?")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}).") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: from the shard index, or all of them."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = _shard_names(index)
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder} is missing shard(s) listed in its index: {', '.join(missing)}. "
                "Download the checkpoint again."
            )
        return [folder / n for n in names]
    files = sorted(p for p in folder.glob("*.safetensors") if ".partial" not in p.name)
    if not files:
        bins = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        hint = " (PyTorch .bin weights are not read: save them as safetensors)" if bins else ""
        raise CheckpointError(f"{folder} has no *.safetensors weights{hint}.")
    return files


def _shard_names(index: Path) -> list[str]:
    """The shard files an index names: strings, each a path inside the model folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index} is damaged (no weight_map). Download it again.") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index} is damaged: weight_map is not an object of tensor -> file. Download it again."
        )
    names = set()
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not _inside(shard):
            raise CheckpointError(
                f"{index} is damaged: weight_map[{tensor!r}] is {shard!r}, which is not the name "
                "of a file inside the model folder. Download the checkpoint again."
            )
        names.add(shard)
    return sorted(names)


def _inside(name: str) -> bool:
    """A relative path that cannot leave its folder (judged on the text: Hub cache
    snapshots are symlinks into a blob store, so resolving would leave it anyway)."""
    path = PurePosixPath(name)
    return (
        bool(name)
        and "\\" not in name
        and "\0" not in name
        and not path.is_absolute()
        and not name.startswith("~")
        and ".." not in path.parts
        and path.parts != (".",)
    )


def read_weights(folder: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for path in weight_files(folder):
        check_safetensors(path)
        try:
            weights.update(mx.load(str(path)))
        except Exception as e:  # the header was fine, the data was not
            raise CheckpointError(f"Cannot read {path}: {e}. Download it again.") from None
    return weights


def quantization_of(config: dict[str, Any]) -> dict[str, Any] | None:
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict) and "bits" in q and "group_size" in q:
        return q
    return None


def apply_quantization(model: Model, weights: dict[str, mx.array], quant: dict[str, Any]) -> None:
    """Turn into quantized modules exactly those whose weights come quantized.

    Per-module settings in the config (keyed by our path or by mlx-lm's) override
    the defaults, as mlx-lm writes them for mixed-precision checkpoints.
    """
    default = {"group_size": quant["group_size"], "bits": quant["bits"]}
    if "mode" in quant:
        default["mode"] = quant["mode"]

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        for key in [path, *mlx_lm_module_paths(path, model.args)]:
            if isinstance(quant.get(key), dict):
                return {**default, **quant[key]}
        return default

    nn.quantize(model, class_predicate=predicate)


def check_weights(model: Model, weights: dict[str, mx.array], folder: Path) -> None:
    """Missing, unexpected and mis-shaped weights, all listed in one message."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [
        f"  {k}: expected {tuple(expected[k].shape)}, found {tuple(weights[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if tuple(expected[k].shape) != tuple(weights[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"The weights in {folder} do not fit its config.json:"]
    if missing:
        lines.append(f"missing ({len(missing)}):")
        lines += [f"  {k} {tuple(expected[k].shape)}" for k in missing]
    if unexpected:
        lines.append(f"unexpected ({len(unexpected)}):")
        lines += [f"  {k} {tuple(weights[k].shape)}" for k in unexpected]
    if shapes:
        lines.append(f"wrong shape ({len(shapes)}):")
        lines += shapes
    lines.append("Check that config.json belongs to these weights, or download the checkpoint again.")
    raise CheckpointError("\n".join(lines))


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    """None, or one of the float dtypes weights can be cast to (by name or as mx.Dtype)."""
    if dtype is None:
        return None
    if isinstance(dtype, mx.Dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(
                f"dtype {dtype} is not a float type weights can be cast to; use one of "
                f"{', '.join(sorted(_DTYPES))} (or None to keep the checkpoint's)."
            )
        return dtype
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ConfigError(
            f"dtype {dtype!r} is not one of {', '.join(sorted(_DTYPES))} (or None to keep the "
            "checkpoint's)."
        )
    return _DTYPES[dtype]


def cast_weights(weights: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    out = {}
    for name, w in weights.items():
        if name.rsplit(".", 1)[-1] in FLOAT32_PARAMS:
            w = w.astype(mx.float32)
        elif dtype is not None and mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(dtype)
        out[name] = w
    return out


def model_from_folder(folder: Path, dtype: str | mx.Dtype | None = None) -> Model:
    config = load_config(folder)
    args = ModelArgs.from_dict(config)
    model = Model(args)
    weights = sanitize(read_weights(folder), args)
    quant = quantization_of(config)
    if quant is not None:
        apply_quantization(model, weights, quant)
    weights = cast_weights(weights, parse_dtype(dtype))
    check_weights(model, weights, folder)
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    mx.eval(model.parameters())
    return model


def load_model(
    path_or_repo_id: str | os.PathLike,
    dtype: str | mx.Dtype | None = None,
    parallel: str | None = None,
    group: mx.distributed.Group | None = None,
) -> Model:
    """Load a Granite 4.0 checkpoint from a local folder or a Hugging Face repo id.

    dtype: "bfloat16", "float16" or "float32" to cast the weights (quantized
    weights stay quantized); None keeps the checkpoint's own.
    parallel: None for this process alone; "pipeline" or "tensor" to hold this
    rank's part of the model across the ranks `mlx.launch` started (`group`, by
    default `mx.distributed.init()`'s); see granite_mlx.parallel.
    """
    folder = resolve_model_path(path_or_repo_id)
    if parallel is None:
        return model_from_folder(folder, dtype)
    from .parallel import load_sharded

    return load_sharded(folder, parallel, dtype, group)


# --- fingerprint_weights ------------------------------------------------------------
# A saved session (a prompt's cache) is only valid for the weights that computed it.
# A fine-tune or a quantized copy has the same config and, but for quantization,
# the same shapes, so only the numbers tell them apart. Reading all of them would
# cost a pass over every weight byte (0.7 GB for H-350M in bf16), so the
# fingerprint hashes, for every parameter in name order: its name, shape and
# dtype (a quantized copy differs there already), and FINGERPRINT_SAMPLES of its
# elements at a fixed stride over the flattened tensor plus its last one, as raw
# bits (not values: -0.0 and 0.0, or uint32 words past float32's 24-bit mantissa,
# are different weights). A fine-tune moves (nearly) every element of the tensors
# it trains, so the sample sees it; a change confined to elements the stride skips
# (one edited row of the embedding) is the price of not reading 0.7 GB.
# H-350M bf16: `python benchmarks/fingerprint_cost.py`
# (benchmarks/results/fingerprint_h350m_cpu.log).

FINGERPRINT_SAMPLES = 1024  # elements read per parameter (all of them when it has fewer)
_BITS = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}  # element size -> same bits


def _weight_sample(w: mx.array) -> mx.array:
    """FINGERPRINT_SAMPLES evenly strided elements of `w` and its last one, as raw bits."""
    flat = w.reshape(-1)
    n = flat.size
    if n > FINGERPRINT_SAMPLES:
        flat = mx.concatenate([flat[:: n // FINGERPRINT_SAMPLES][:FINGERPRINT_SAMPLES], flat[-1:]])
    bits = _BITS[flat.itemsize]
    return flat if flat.dtype == bits else flat.view(bits)


def fingerprint_weights(model: nn.Module) -> str:
    """A hex id (32 characters) of the weights themselves, not only the architecture.

    Equal for the same checkpoint loaded twice (in the same dtype), in any process;
    different for a fine-tune that moves a tensor, a quantized copy, another dtype.
    About 20-40 ms for H-350M on a 2-core CPU.
    """
    import hashlib

    import numpy as np

    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    samples = [_weight_sample(w) for _, w in params]
    mx.eval(samples)
    digest = hashlib.blake2b(digest_size=16)
    for (name, w), sample in zip(params, samples):
        digest.update(f"{name}|{w.dtype}|{tuple(w.shape)}|".encode())
        digest.update(np.asarray(sample).tobytes())
    return digest.hexdigest()
