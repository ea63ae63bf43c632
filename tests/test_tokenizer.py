"""Tokenizer loading, stop ids, and streaming detokenization on the real Granite 4.0 tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper

from granite_mlx.errors import ConfigError, GraniteError
from granite_mlx.tokenizer import TokenizerError, load_tokenizer, stop_token_ids

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "tokenizer"
REFERENCE = json.loads((FIXTURES / "chat_reference.json").read_text(encoding="utf-8"))
EOT = 100257


@pytest.fixture(scope="module")
def tok() -> TokenizerWrapper:
    return load_tokenizer(TOKENIZER_DIR)


def _checkpoint_copy(dst: Path, with_template: bool = True) -> Path:
    """A checkpoint folder holding the fixture tokenizer files (tokenizer.json linked)."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in TOKENIZER_DIR.iterdir():
        if path.name == "chat_template.jinja" and not with_template:
            continue
        if path.name == "tokenizer.json":
            try:
                (dst / path.name).symlink_to(path.resolve())
                continue
            except OSError:
                pass
        shutil.copy(path, dst / path.name)
    return dst


def test_loads_as_mlx_lm_wrapper(tok: TokenizerWrapper) -> None:
    assert isinstance(tok, TokenizerWrapper)
    assert tok.eos_token_ids == {EOT}
    assert tok.eos_token_id == EOT
    assert tok.bos_token_id == EOT
    assert tok.pad_token_id == 100256
    assert len(tok) == 100352


def test_chat_template_comes_from_jinja_file(tok: TokenizerWrapper) -> None:
    expected = (TOKENIZER_DIR / "chat_template.jinja").read_text(encoding="utf-8")
    assert tok.chat_template == expected
    assert tok.has_chat_template


def test_jinja_file_beats_tokenizer_config(tmp_path: Path) -> None:
    folder = _checkpoint_copy(tmp_path / "ckpt")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = "STALE {{ messages }}"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    (folder / "chat_template.jinja").write_text("FRESH {{ messages }}", encoding="utf-8")
    assert load_tokenizer(folder).chat_template == "FRESH {{ messages }}"


def test_no_jinja_file_keeps_config_template_or_none(tmp_path: Path) -> None:
    folder = _checkpoint_copy(tmp_path / "ckpt", with_template=False)
    assert not load_tokenizer(folder).chat_template


def test_stop_ids_are_the_union_of_configs(tmp_path: Path) -> None:
    folder = _checkpoint_copy(tmp_path / "ckpt")
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [EOT, 100270]}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 100265}))
    assert stop_token_ids(folder) == {EOT, 100270, 100265}
    assert load_tokenizer(folder).eos_token_ids == {EOT, 100270, 100265}


def test_null_eos_in_config_is_ignored(tmp_path: Path) -> None:
    folder = _checkpoint_copy(tmp_path / "ckpt")
    (folder / "config.json").write_text(json.dumps({"eos_token_id": None}))
    assert load_tokenizer(folder).eos_token_ids == {EOT}


@pytest.mark.parametrize("bad", ['"<|end_of_text|>"', "[1, true]", "{"])
def test_bad_eos_config_is_a_config_error(tmp_path: Path, bad: str) -> None:
    folder = _checkpoint_copy(tmp_path / "ckpt")
    (folder / "config.json").write_text('{"eos_token_id": ' + bad + "}")
    with pytest.raises(ConfigError, match="config.json"):
        load_tokenizer(folder)


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_folder_without_tokenizer_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GraniteError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_tokenizer_without_any_eos_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").symlink_to((TOKENIZER_DIR / "tokenizer.json").resolve())
    with pytest.raises(TokenizerError, match="end-of-sequence"):
        load_tokenizer(tmp_path)
    # A config naming the stop id is enough.
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": EOT}))
    assert load_tokenizer(str(tmp_path)).eos_token_ids == {EOT}


def test_damaged_tokenizer_json_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    shutil.copy(TOKENIZER_DIR / "tokenizer_config.json", tmp_path)
    with pytest.raises(TokenizerError, match="Could not load the tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("entry", REFERENCE["texts"], ids=lambda e: e["text"][:12])
def test_encode_decode_matches_transformers(tok: TokenizerWrapper, entry: dict) -> None:
    assert tok.encode(entry["text"], add_special_tokens=False) == entry["ids"]
    assert tok.decode(entry["ids"]) == entry["text"]


def test_role_and_tool_tokens_are_single_tokens(tok: TokenizerWrapper) -> None:
    assert tok.encode("<|start_of_role|>user<|end_of_role|>", add_special_tokens=False) == [
        100264,
        882,
        100265,
    ]
    assert tok.encode("<tool_call></tool_call>", add_special_tokens=False) == [100270, 100271]


def _stream(tok: TokenizerWrapper, ids: list[int]) -> list[str]:
    detok = tok.detokenizer
    segments = []
    for token in ids:
        detok.add_token(token)
        segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    return segments


def test_emoji_split_over_tokens_never_streams_broken_utf8(tok: TokenizerWrapper) -> None:
    ids = tok.encode("Hi 👨‍👩‍👧‍👦 and 🧑🏿‍🚀!", add_special_tokens=False)
    # Precondition: one emoji really is several tokens here.
    assert len(tok.encode("🚀", add_special_tokens=False)) > 1
    segments = _stream(tok, ids)
    for segment in segments:
        assert "\ufffd" not in segment
        segment.encode("utf-8")  # no lone surrogates
    # Some steps must have been held back (emitted nothing) mid-emoji.
    assert "" in segments[:-1]
    assert "".join(segments) == tok.decode(ids)


@pytest.mark.parametrize("entry", REFERENCE["texts"], ids=lambda e: e["text"][:12])
def test_streaming_matches_decode(tok: TokenizerWrapper, entry: dict) -> None:
    segments = _stream(tok, entry["ids"])
    assert all("\ufffd" not in s for s in segments)
    # mlx-lm's BPE detokenizer drops a leading space of the very first text.
    assert "".join(segments) == tok.decode(entry["ids"]).removeprefix(" ")


def test_streaming_a_whole_chat_prompt(tok: TokenizerWrapper) -> None:
    case = next(c for c in REFERENCE["cases"] if c["name"] == "multilingual_emoji")
    segments = _stream(tok, case["ids"])
    assert all("\ufffd" not in s for s in segments)
    assert "".join(segments) == case["text"]


def test_detokenizer_copies_are_independent(tok: TokenizerWrapper) -> None:
    a, b = tok.detokenizer, tok.detokenizer
    a.add_token(15339)
    assert b.tokens == []
