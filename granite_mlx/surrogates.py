"""Text that cannot be encoded: lone UTF-16 surrogates.

A Python `str` may hold a lone surrogate (U+D800..U+DFFF) that no UTF-8 text
can: JSON's "\\ud800" escape decodes to one, and Python turns the invalid UTF-8
bytes of argv (and of stdin, in some locales) into them. The tokenizer, SQLite
and every file write then fail on it, possibly turns later. So each boundary
where outside text comes in (prompts from the command line, library messages,
tool-call arguments a model wrote) checks with `surrogate_at` and refuses it
there, naming the place.
"""

from __future__ import annotations

__all__ = ["describe_surrogate", "surrogate_at"]


def surrogate_at(text: str) -> int | None:
    """Index of the first character of `text` that UTF-8 cannot encode, or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def describe_surrogate(text: str, index: int) -> str:
    """E.g. "a lone surrogate \\udcff at character 3", for error messages."""
    return f"a lone surrogate \\u{ord(text[index]):04x} at character {index}"
