"""Load a Granite checkpoint's tokenizer as an mlx-lm ``TokenizerWrapper``.

The wrapper (and its streaming detokenizer, which holds back incomplete UTF-8)
comes from mlx-lm; this module only decides which files feed it and which token
ids stop generation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from granite_mlx.errors import ConfigError, GraniteError

if TYPE_CHECKING:  # mlx-lm imports transformers: pay for it only when a tokenizer is loaded
    from mlx_lm.tokenizer_utils import TokenizerWrapper

__all__ = [
    "TokenizerError",
    "load_tokenizer",
    "stop_token_ids",
]

#: Hub checkpoints ship the official template in this file, not in tokenizer_config.json.
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Any one of these is enough for transformers to build the tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


class TokenizerError(GraniteError):
    """The folder holds no usable tokenizer."""


def _read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path``; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{path} is not valid JSON ({exc}). Restore it from the original checkpoint."
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} should hold a JSON object, not {type(data).__name__}. "
            "Restore it from the original checkpoint."
        )
    return data


def _as_id_list(value: Any, source: Path) -> list[int]:
    """``eos_token_id`` may be an int, a list of ints, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    # bool is an int subclass, but `true` is certainly not a token id.
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(
            f"eos_token_id in {source} is {value!r}; it must be a token id or a list of them. "
            "Fix the value or restore the file from the original checkpoint."
        )
    return values


def stop_token_ids(folder: Path | str) -> set[int]:
    """EOS ids named by the checkpoint's generation_config.json and config.json.

    The tokenizer's own EOS is added by ``TokenizerWrapper`` on top of these.
    """
    folder = Path(folder)
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        ids.update(_as_id_list(_read_json(path).get("eos_token_id"), path))
    return ids


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise TokenizerError(
            f"Tokenizer folder {folder} does not exist. Pass the checkpoint folder that "
            "holds tokenizer.json and tokenizer_config.json."
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise TokenizerError(
            f"No tokenizer in {folder}: expected tokenizer.json (with tokenizer_config.json). "
            "Copy the tokenizer files from the original Hugging Face checkpoint into this folder."
        )


def load_tokenizer(folder: Path | str) -> TokenizerWrapper:
    """Load the tokenizer of the checkpoint in ``folder``.

    Uses tokenizer.json and tokenizer_config.json, plus chat_template.jinja when
    present (it then becomes the tokenizer's ``chat_template``, whatever
    transformers version is installed). Generation stops at any id in
    ``wrapper.eos_token_ids``: the union of the eos ids of generation_config.json,
    config.json and the tokenizer's own EOS.

    Raises:
        TokenizerError: the folder is missing, holds no tokenizer files, or
            names no EOS token anywhere.
        ConfigError: a config file is not valid JSON or has a bad ``eos_token_id``.
    """
    folder = Path(folder).expanduser()
    _check_folder(folder)
    eos_ids = stop_token_ids(folder)

    extra: dict[str, Any] = {}
    template_file = folder / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        # Passed explicitly: older transformers ignore the separate file, and
        # mlx-lm infers its tool parser from the template at load time.
        extra["chat_template"] = template_file.read_text(encoding="utf-8")

    # Some mlx-lm releases name this load_tokenizer; accept either.
    from mlx_lm import tokenizer_utils

    loader = getattr(tokenizer_utils, "load", None) or tokenizer_utils.load_tokenizer
    try:
        wrapper = loader(folder, tokenizer_config_extra=extra, eos_token_ids=sorted(eos_ids))
    except Exception as exc:  # tokenizers raises bare Exception on a damaged tokenizer.json
        raise TokenizerError(
            f"Could not load the tokenizer in {folder}: {exc}. "
            "Check that tokenizer.json and tokenizer_config.json come from the same checkpoint."
        ) from exc
    if not wrapper.eos_token_ids:
        # Without a stop id generation would run to the token limit every time.
        raise TokenizerError(
            f"The tokenizer in {folder} names no end-of-sequence token. Copy tokenizer_config.json "
            "(and generation_config.json) from the original checkpoint into this folder."
        )
    return wrapper
