"""Sampled tokens -> the text to show, stop strings and tool calls.

Three stages, each holding back what the next token may change: mlx-lm's
streaming detokenizer (never a broken UTF-8 character), the stop strings (never
shown, even when split across tokens) and the tool-call parser (a tail that
could begin ``<tool_call>``, or an open call: its markup is never shown).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .tool_calls import ParseUpdate, ToolCallParser


class TextAssembler:
    """Turns one answer's sampled tokens into the text to show and the tool calls made."""

    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] = (),
        tools: Sequence[str | Mapping[str, Any]] | None = None,
    ):
        self._detokenizer = tokenizer.detokenizer
        self._stop = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._pending = ""  # text that may still turn out to start a stop string
        self._parser = ToolCallParser(tools)  # a call to an undeclared tool comes back invalid
        self.stopped = False  # a stop string was found; later text is dropped

    def add(self, token: int) -> ParseUpdate:
        """Add one token (not EOS); return the text and calls it releases."""
        self._detokenizer.add_token(token)
        return self._release(self._detokenizer.last_segment, final=False)

    def finish(self) -> ParseUpdate:
        """End of generation: release everything still held back."""
        self._detokenizer.finalize()
        text, calls = self._release(self._detokenizer.last_segment, final=True)
        rest, more = self._parser.finish()
        return ParseUpdate(text + rest, calls + more)

    def _release(self, segment: str, final: bool) -> ParseUpdate:
        if self.stopped:
            return ParseUpdate("", [])
        text = self._pending + segment
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            shown, self._pending = text[:cut], ""
        elif final:
            shown, self._pending = text, ""
        else:
            keep = self._stop_prefix_length(text)
            shown, self._pending = text[: len(text) - keep], text[len(text) - keep :]
        return self._parser.feed(shown) if shown else ParseUpdate("", [])

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is the start of a stop string."""
        for n in range(min(len(text), self._longest_stop - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
