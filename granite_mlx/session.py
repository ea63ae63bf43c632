"""`ChatSession`: a conversation that keeps its cache, so each turn prefills only new tokens.

How a turn reuses the cache:

* The session knows the token ids its cache has consumed (``_ids``).
* Each turn renders the whole conversation to ids with the chat template.
* If ``_ids`` is a prefix of them, only the rest is prefilled.
* Otherwise (an edit, a regenerate, an answer whose tokens differ from how
  its text re-encodes, a new system prompt) the session falls back to the
  longest snapshot whose tokens are still a prefix; an attention-only model
  is instead trimmed to the common prefix. With neither, it starts afresh.

Snapshots are taken at turn boundaries: when a prompt is in the cache but for
its last token (so regenerating costs one token), and when an answer ends.
A Mamba2 snapshot holds the state arrays, an attention snapshot only a length
(its earlier positions are never rewritten), so restoring to one makes every
later snapshot invalid: those are dropped.

Which answer tokens are in the cache? Generation queues the model call for a
token before it knows whether that token is EOS, so the cache holds a prefix of
prompt + sampled tokens whose length is ``cache_length(cache)``: the EOS
included when it was sampled, the last token left out at max_tokens. The
session records exactly that prefix, and the next turn's prefix check (on
token ids) takes it from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .cache import (
    CacheSnapshot,
    MambaCache,
    cache_length,
    can_trim,
    load_cache,
    restore,
    save_cache,
    snapshot,
    trim,
)
from .chat_format import encode_prompt
from .errors import GraniteError
from .generate import GenerationResponse, stream_from_ids
from .model import Model

__all__ = ["ChatSession", "SessionError"]

SESSION_FORMAT = "granite-mlx-session/1"
# Options the session sets itself; a caller passing them is a mistake.
_RESERVED = ("cache", "tools", "documents", "on_prefilled")


class SessionError(GraniteError):
    """The conversation cannot do what was asked (nothing to regenerate, a bad session file)."""


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _fingerprint(model: Model) -> dict[str, Any]:
    """What a saved cache must match to be used with ``model``."""
    args = model.args
    keys = (
        "vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "num_attention_heads",
        "num_key_value_heads", "mamba_n_heads", "mamba_d_head", "mamba_d_state",
    )  # fmt: skip
    return {k: getattr(args, k, None) for k in keys}


class ChatSession:
    """A multi-turn chat with one model, reusing its cache from turn to turn.

    ``messages`` holds the turns (``{"role", "content"}``, assistant turns with
    ``"tool_calls"`` when the model called tools); the system prompt is kept
    apart in ``system``. ``send``, ``regenerate`` and ``edit_last`` stream
    `GenerationResponse` objects and take `stream_generate`'s options; the
    answer (partial if cancelled or closed early) is appended when the stream
    ends. To hand a tool result back, append ``{"role": "tool", "content": ...}``
    to ``messages`` and call ``regenerate()``, which answers the last turn.
    """

    #: Snapshots kept: enough to regenerate the last answer and to edit the last question.
    max_snapshots = 4

    def __init__(
        self,
        model: Model,
        tokenizer: Any,
        system: str | None = None,
        tools: list | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.tools = tools
        self.messages: list[dict[str, Any]] = []
        self.last_prefill_tokens = 0
        self._reset_cache()

    # --- the conversation ------------------------------------------------------------

    @classmethod
    def from_messages(
        cls,
        model: Model,
        tokenizer: Any,
        messages: Sequence[Mapping[str, Any]],
        system: str | None = None,
        tools: list | None = None,
    ) -> ChatSession:
        """A session resuming ``messages``; the first turn prefills them all.

        A leading system message becomes ``system`` unless one is given.
        """
        session = cls(model, tokenizer, system=system, tools=tools)
        history = [dict(m) for m in messages]
        if history and history[0].get("role") == "system":
            first = history.pop(0)
            if system is None:
                session.system = first.get("content")
        session.messages = history
        return session

    def set_system(self, text: str | None) -> None:
        """Change the system prompt; the next turn re-prefills only if it changed."""
        self.system = text

    def send(self, text: str, **options: Any) -> Iterator[GenerationResponse]:
        """Add a user message and stream the answer."""
        yield from self._respond([*self.messages, {"role": "user", "content": text}], options)

    def regenerate(self, **options: Any) -> Iterator[GenerationResponse]:
        """Drop the last answer (if the conversation ends with one) and answer again."""
        messages = list(self.messages)
        if messages and messages[-1].get("role") == "assistant":
            messages.pop()
        if not messages or messages[-1].get("role") not in ("user", "tool"):
            raise SessionError("There is nothing to regenerate: the conversation has no question.")
        yield from self._respond(messages, options)

    def edit_last(self, text: str, **options: Any) -> Iterator[GenerationResponse]:
        """Replace the last user message (dropping what followed it) and answer it."""
        last_user = max(
            (i for i, m in enumerate(self.messages) if m.get("role") == "user"), default=None
        )
        if last_user is None:
            raise SessionError("There is no user message to edit.")
        messages = [*self.messages[:last_user], {"role": "user", "content": text}]
        yield from self._respond(messages, options)

    def _history(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def _respond(
        self, messages: list[dict[str, Any]], options: dict[str, Any]
    ) -> Iterator[GenerationResponse]:
        """Answer ``messages`` (which end with the question), then record the answer."""
        reserved = [k for k in _RESERVED if k in options]
        if reserved:
            raise TypeError(f"ChatSession sets {', '.join(reserved)} itself; do not pass it")
        previous = self.messages
        self.messages = messages
        try:
            ids = encode_prompt(self.tokenizer, self._history(), tools=self.tools)
            start = self._reuse(ids)
            stream = stream_from_ids(
                self.model, self.tokenizer, ids[start:], cache=self._cache,
                on_prefilled=self._remember, **options,
            )  # fmt: skip
        except BaseException:
            self.messages = previous
            raise
        self.last_prefill_tokens = len(ids) - start
        sampled: list[int] = []
        text: list[str] = []
        calls = []
        failed = False
        try:
            for response in stream:
                if response.token is not None:
                    sampled.append(response.token)
                text.append(response.text)
                calls += response.tool_calls
                yield response
        except GeneratorExit:  # closed early: keep the partial answer
            raise
        except BaseException:
            failed = True
            raise
        finally:
            stream.close()
            if failed:
                # The cache may be half-updated: forget it, and the unanswered question.
                self.messages = previous
                self._reset_cache()
            else:
                self._ids = (ids + sampled)[: cache_length(self._cache)]
                self.messages.append(self._answer_message("".join(text), calls))
                self._remember()

    @staticmethod
    def _answer_message(text: str, calls: list) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        valid = [c.to_openai() for c in calls if c.valid]
        if valid:  # an invalid call cannot be rendered back; it was reported in the stream
            message["tool_calls"] = valid
        return message

    # --- the cache -----------------------------------------------------------------

    def _reset_cache(self) -> None:
        self._cache = self.model.make_cache()
        self._ids: list[int] = []  # the tokens the cache has consumed
        self._snapshots: list[tuple[int, CacheSnapshot]] = []  # (length, snapshot), ascending

    def _remember(self) -> None:
        """Snapshot the cache as it is now."""
        length = cache_length(self._cache)
        kept = [(n, s) for n, s in self._snapshots if n != length]
        kept.append((length, snapshot(self._cache)))
        kept.sort(key=lambda item: item[0])
        self._snapshots = kept[-self.max_snapshots :]

    def _truncate(self, length: int) -> None:
        """The cache now holds ``_ids[:length]``; later snapshots are invalid."""
        self._ids = self._ids[:length]
        self._snapshots = [(n, s) for n, s in self._snapshots if n <= length]

    def _reuse(self, ids: list[int]) -> int:
        """Bring the cache to the longest usable prefix of ``ids``; return its length.

        At least the last token of ``ids`` is always left to feed: its logits
        give the answer's first token.
        """
        limit = len(ids) - 1
        held = len(self._ids)
        common = _common_prefix(self._ids, ids, limit)
        if common == held:
            return held
        if can_trim(self._cache):
            trim(self._cache, held - common)
            self._truncate(common)
            return common
        for length, snap in reversed(self._snapshots):
            if length <= common:
                restore(self._cache, snap)
                self._truncate(length)
                return length
        self._reset_cache()
        return 0

    # --- saving ------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the conversation, the cache and its snapshots to one file, atomically.

        `load` resumes it exactly: the next turn prefills only what is new.
        """
        # Snapshots ride along as extra Mamba layers after the real ones, so one
        # save_cache file (written to a temporary name, then renamed) holds it all.
        layers = list(self._cache)
        for _, snap in self._snapshots:
            for layer, state in zip(self._cache, snap.layers):
                if isinstance(layer, MambaCache):
                    extra = MambaCache()
                    extra.conv_state, extra.ssm_state, _ = state
                    layers.append(extra)
        metadata = {
            "session": SESSION_FORMAT,
            "model": _fingerprint(self.model),
            "layers": len(self._cache),
            "system": self.system,
            "tools": self.tools,
            "messages": self.messages,
            "ids": self._ids,
            "snapshots": [n for n, _ in self._snapshots],
        }
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as exc:
            raise SessionError(f"Cannot save the session: a message is not JSON ({exc}).") from exc
        save_cache(path, layers, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model, tokenizer: Any) -> ChatSession:
        """Resume a session written by `save` (with the same model)."""
        layers, meta = load_cache(path)
        if meta.get("session") != SESSION_FORMAT:
            raise SessionError(f"{path} is not a saved chat session.")
        if meta.get("model") != json.loads(json.dumps(_fingerprint(model))):
            raise SessionError(f"{path} was saved with a different model; start the chat afresh.")
        session = cls(model, tokenizer, system=meta.get("system"), tools=meta.get("tools"))
        session.messages = list(meta.get("messages") or [])
        count = meta["layers"]
        cache, extra = layers[:count], iter(layers[count:])
        snapshots = []
        for length in meta.get("snapshots", []):
            states: list[Any] = []
            for layer in cache:
                if isinstance(layer, MambaCache):
                    saved = next(extra)
                    states.append((saved.conv_state, saved.ssm_state, length))
                else:
                    states.append(length)
            snapshots.append((length, CacheSnapshot(tuple(states), length)))
        session._cache, session._ids, session._snapshots = cache, list(meta["ids"]), snapshots
        return session
