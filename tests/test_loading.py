"""Loading every layout, and every loading error with a clear message."""

import json
import shutil

import mlx.core as mx
import pytest
from conftest import REFERENCE, checkpoint

from granite_mlx import CheckpointError, ConfigError, ModelNotFoundError, load_model


def logits_of(model, case="hybrid_nope"):
    return model(mx.load(str(REFERENCE / f"{case}.safetensors"))["input_ids"])


def copy_case(tmp_path, case="hybrid_nope"):
    dst = tmp_path / case
    shutil.copytree(checkpoint(case), dst)
    return dst


def mlx_lm_convert(case, dst, bits=None):
    """A checkpoint in mlx-lm's layout, written by mlx-lm itself (as mlx-community's are)."""
    from mlx_lm.utils import load_model as lm_load
    from mlx_lm.utils import quantize_model, save_config, save_model

    # mlx-lm clamps dt at 0.001 unless told the checkpoint's (absent = unbounded) limit.
    model, config = lm_load(checkpoint(case), model_config={"time_step_limit": [0.0, float("inf")]})
    if bits:
        model, config = quantize_model(model, config, 32, bits)
    save_model(dst, model)
    save_config(config, dst / "config.json")
    return model


def test_redundant_lm_head_is_dropped():
    weights = mx.load(str(checkpoint("hybrid_nope") / "model.safetensors"))
    assert "lm_head.weight" in weights  # this fixture ships one, as some Hub checkpoints do
    model = load_model(checkpoint("hybrid_nope"))
    assert model.args.tie_word_embeddings and "lm_head" not in model


@pytest.mark.parametrize("case", ["hybrid_nope", "moe_hybrid"])
def test_mlx_lm_layout_unquantized_equals_hub(tmp_path, case):
    mlx_lm_convert(case, tmp_path)
    assert mx.array_equal(logits_of(load_model(tmp_path), case), logits_of(load_model(checkpoint(case)), case))


@pytest.mark.parametrize("case", ["hybrid_nope", "moe_hybrid"])
def test_mlx_community_quantized_checkpoint_loads(tmp_path, case):
    theirs = mlx_lm_convert(case, tmp_path, bits=4)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    ours = load_model(tmp_path)
    a, b = logits_of(ours, case), logits_of(theirs, case)
    assert (mx.abs(a - b).max() / mx.abs(b).max()).item() < 1e-4


def test_sharded_with_index(tmp_path):
    src = checkpoint("moe_hybrid")
    weights = mx.load(str(src / "model.safetensors"))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    dst = tmp_path / "sharded"
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    weight_map = {}
    for file, keys in shards.items():
        mx.save_safetensors(str(dst / file), {k: weights[k] for k in keys})
        weight_map.update({k: file for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert mx.array_equal(logits_of(load_model(dst), "moe_hybrid"), logits_of(load_model(src), "moe_hybrid"))

    (dst / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        load_model(dst)


def test_dtype_cast_keeps_ssm_params_float32():
    model = load_model(checkpoint("hybrid_nope"), dtype="bfloat16")
    mamba = next(layer.mamba for layer in model.layers if layer.kind == "mamba")
    assert mamba.in_proj.weight.dtype == mx.bfloat16
    assert mamba.A_log.dtype == mamba.D.dtype == mamba.dt_bias.dtype == mx.float32
    with pytest.raises(ConfigError, match="dtype"):
        load_model(checkpoint("hybrid_nope"), dtype="float8")


def test_missing_folder():
    with pytest.raises(ModelNotFoundError, match="No model folder"):
        load_model("./no/such/folder")


def test_unreachable_repo_says_how_to_pass_a_local_path(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="local folder"):
        load_model("ibm-granite/granite-4.0-h-350m")


def test_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(tmp_path)


def test_no_weights(tmp_path):
    dst = copy_case(tmp_path)
    (dst / "model.safetensors").unlink()
    (dst / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no \\*.safetensors.*bin"):
        load_model(dst)


def test_missing_unexpected_and_misshaped_weights_in_one_message(tmp_path):
    dst = copy_case(tmp_path)
    weights = mx.load(str(dst / "model.safetensors"))
    weights.pop("model.layers.0.mamba.D")
    weights.pop("model.norm.weight")
    weights["model.layers.0.mamba.extra"] = mx.zeros((3,))
    weights["model.layers.2.mamba.out_proj.weight"] = mx.zeros((5, 7))
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    with pytest.raises(CheckpointError) as e:
        load_model(dst)
    msg = str(e.value)
    assert "missing (2)" in msg and "model.layers.0.mamba.D" in msg and "model.norm.weight" in msg
    assert "unexpected (1)" in msg and "model.layers.0.mamba.extra (3,)" in msg
    assert "wrong shape (1)" in msg and "expected (64, 128), found (5, 7)" in msg


def test_config_that_does_not_fit_weights(tmp_path):
    dst = copy_case(tmp_path)
    config = json.loads((dst / "config.json").read_text())
    config["num_hidden_layers"] += 1
    key = "layer_types" if "layer_types" in config else "layers_block_type"
    config[key] = config[key] + ["mamba"]
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(dst)


@pytest.mark.parametrize("keep", [0, 5, 100, -1000])
def test_truncated_safetensors(tmp_path, keep):
    dst = copy_case(tmp_path)
    path = dst / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])  # negative: cut that many bytes off the end
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_model(dst)


def test_corrupt_header(tmp_path):
    dst = copy_case(tmp_path)
    path = dst / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(dst)


def test_other_model_type(tmp_path):
    dst = copy_case(tmp_path)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = "llama"
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        load_model(dst)


def rewrite_header(path, change):
    """Apply `change` to the parsed safetensors header of `path`, keep the data."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def first_tensors(header):
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"])


def _set(key, value, which=0):
    def change(header):
        header[first_tensors(header)[which]][key] = value

    return change


def _offsets_as(kind):
    def change(header):
        entry = header[first_tensors(header)[0]]
        entry["data_offsets"] = [kind(x) for x in entry["data_offsets"]]

    return change


def _overlap(header):
    a, b = first_tensors(header)[:2]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    start = header[a]["data_offsets"][0]
    header[b]["data_offsets"] = [start, start + size]


@pytest.mark.parametrize(
    "change, message",
    [
        (_offsets_as(float), "corrupt data_offsets"),
        (_offsets_as(str), "corrupt data_offsets"),
        (_set("data_offsets", [0]), "corrupt data_offsets"),
        (_set("data_offsets", None), "corrupt data_offsets"),
        (_set("shape", [2.0, "x"]), "corrupt shape"),
        (_set("shape", "big"), "corrupt shape"),
        (_set("dtype", ["F32"]), "unknown dtype"),
        (_set("dtype", "F12"), "unknown dtype"),
        (_overlap, "overlap"),
    ],
    ids=["float offsets", "string offsets", "one offset", "null offsets", "bad shape",
         "string shape", "list dtype", "unknown dtype", "overlapping tensors"],
)  # fmt: skip
def test_damaged_safetensors_header_entries(tmp_path, change, message):
    dst = copy_case(tmp_path)
    rewrite_header(dst / "model.safetensors", change)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(dst)
    assert "\n" not in str(e.value)


def sharded_copy(tmp_path):
    """hybrid_nope as two shards with an index."""
    dst = copy_case(tmp_path)
    weights = mx.load(str(dst / "model.safetensors"))
    names = sorted(weights)
    (dst / "model.safetensors").unlink()
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        mx.save_safetensors(str(dst / file), {k: weights[k] for k in part})
        weight_map.update(dict.fromkeys(part, file))
    return dst, weight_map


@pytest.mark.parametrize(
    "bad", [7, None, ["model-00001-of-00002.safetensors"], "../hybrid_nope/model.safetensors",
            "/etc/passwd", "~/model.safetensors", "", "sub\\..\\..\\x.safetensors"],
)  # fmt: skip
def test_index_naming_no_file_inside_the_folder_is_refused(tmp_path, bad):
    dst, weight_map = sharded_copy(tmp_path)
    # A real file outside the model folder: it must not be read.
    shutil.copy(checkpoint("hybrid_nope") / "model.safetensors", tmp_path / "outside.safetensors")
    weight_map[next(iter(weight_map))] = bad
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="not the name of a file inside the model folder"):
        load_model(dst)


def test_index_without_a_weight_map_object(tmp_path):
    dst, _ = sharded_copy(tmp_path)
    for index in ({"weight_map": ["a"]}, {"weight_map": {}}, [], {"metadata": {}}):
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="damaged"):
            load_model(dst)


def test_sharded_index_still_loads(tmp_path):
    dst, weight_map = sharded_copy(tmp_path)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    expected = logits_of(load_model(checkpoint("hybrid_nope")))
    assert mx.array_equal(logits_of(load_model(dst)), expected)


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.bool_, "int8", 16, ["float32"]])
def test_dtype_must_be_a_float_type(dtype):
    with pytest.raises(ConfigError, match="dtype"):
        load_model(checkpoint("hybrid_nope"), dtype=dtype)


# --- fingerprint_weights: the weights themselves, cheaply -------------------------


def test_fingerprint_is_stable_across_loads_and_processes():
    import subprocess
    import sys

    from granite_mlx import fingerprint_weights

    a = fingerprint_weights(load_model(checkpoint("hybrid_nope")))
    assert a == fingerprint_weights(load_model(checkpoint("hybrid_nope")))
    code = (
        "from granite_mlx import fingerprint_weights, load_model; "
        f"print(fingerprint_weights(load_model({str(checkpoint('hybrid_nope'))!r})))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == a
    assert a != fingerprint_weights(load_model(checkpoint("moe_hybrid")))


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.layers.2.mamba.D",
                                    "model.layers.1.self_attn.k_proj.weight"])  # fmt: skip
def test_fingerprint_sees_a_fine_tune_of_one_tensor(tmp_path, dtype, tensor):
    """Same config and shapes, one tensor moved by ~0.5% (what a fine-tune does to
    the tensors it trains): another fingerprint."""
    from granite_mlx import fingerprint_weights

    dst = copy_case(tmp_path)
    weights = mx.load(str(dst / "model.safetensors"))
    assert tensor in weights
    w = weights[tensor]
    noise = mx.random.normal(w.shape, key=mx.random.key(0))
    weights[tensor] = (w * (1 + 5e-3 * noise)).astype(w.dtype)
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    original = fingerprint_weights(load_model(checkpoint("hybrid_nope"), dtype=dtype))
    assert fingerprint_weights(load_model(dst, dtype=dtype)) != original


def test_fingerprint_sees_a_quantized_copy_and_another_dtype(tmp_path):
    from mlx import nn

    from granite_mlx import fingerprint_weights

    model = load_model(checkpoint("hybrid_nope"))
    original = fingerprint_weights(model)
    assert fingerprint_weights(load_model(checkpoint("hybrid_nope"), dtype="bfloat16")) != original
    nn.quantize(model, group_size=32, bits=8)
    assert fingerprint_weights(model) != original
