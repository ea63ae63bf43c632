"""`ChatSession`: a conversation that keeps its cache, so each turn prefills only new tokens.

A client of the engine, like the server: each turn renders the whole
conversation to token ids and hands them to an engine with the session's own
`PromptCache`.

* The session's live cache holds the tokens it has consumed (``_ids``). When
  they are a prefix of the new turn's ids, only the rest is prefilled.
* Otherwise (an edit, a regenerate, an answer whose tokens differ from how its
  text re-encodes, a new system prompt) the turn starts from an empty cache,
  and the engine resumes it from the longest snapshot in the prompt cache that
  is a prefix of the new ids (any shared prefix for an attention-only model).

Snapshots are taken where each message ends, when a prompt is in the cache but
for its last token, when all of it is in (with the logits after it, so that
regenerating needs no model pass before its first token) and when an answer
ends; the prompt cache keeps the most recently used within its byte budget.

Which answer tokens are in the cache? The engine may queue the model call for a
token before it knows whether that token is EOS, so the cache holds a prefix of
prompt + sampled tokens whose length is ``cache_length(cache)``. The session
records exactly that prefix, and the next turn's prefix check (on token ids)
takes it from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .cache import Cache, KVCache, MambaCache, cache_length, load_cache, save_cache
from .chat_format import encode_prompt, snapshot_points
from .constrain import build_constraint
from .errors import CheckpointError, GraniteError
from .generate import GenerationResponse, make_request, run_request
from .model import Model
from .prompt_cache import PromptCache

__all__ = ["ChatSession", "SessionError"]

SESSION_FORMAT = "granite-mlx-session/2"
# Options the session sets itself; a caller passing them is a mistake.
_RESERVED = ("cache", "context", "snapshot_at", "tools", "documents")


class SessionError(GraniteError):
    """The conversation cannot do what was asked (nothing to regenerate, a bad session file)."""


def _architecture(model: Model) -> dict[str, Any]:
    """What a saved cache must match to be used with ``model``."""
    args = model.args
    keys = (
        "vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "num_attention_heads",
        "num_key_value_heads", "mamba_n_heads", "mamba_d_head", "mamba_d_state",
    )  # fmt: skip
    out = {k: getattr(args, k, None) for k in keys}
    shard = getattr(model, "shard", None)  # a rank's part of a model (granite_mlx.parallel)
    if shard is not None:
        out["shard"] = shard.describe()
    return out


def state_bytes(model: Model) -> int:
    """Bytes of one snapshot's Mamba2 states (conv window + float32 SSM state)."""
    total = 0
    for layer in model.layers:
        if layer.kind == "mamba":
            m = layer.mamba
            total += 4 * (m.n_heads * m.head_dim * m.d_state + (m.d_conv - 1) * m.conv_dim)
    return total


class ChatSession:
    """A multi-turn chat with one model, reusing its cache from turn to turn.

    ``messages`` holds the turns (``{"role", "content"}``, assistant turns with
    ``"tool_calls"`` when the model called tools); the system prompt is kept
    apart in ``system``, and ``tools`` / ``documents`` apply to every turn.
    ``send``, ``regenerate`` and ``edit_last`` stream `GenerationResponse`
    objects and take `stream_generate`'s options; the answer (partial if
    cancelled or closed early) is appended when the stream ends. To hand a tool
    result back, append ``{"role": "tool", "content": ...}`` to ``messages`` and
    call ``regenerate()``, which answers the last turn.
    """

    #: Snapshots the session's prompt cache is sized for (plus the K/V they need).
    max_snapshots = 8
    #: Snapshots `save` writes with the conversation.
    saved_snapshots = 3

    def __init__(
        self,
        model: Model,
        tokenizer: Any,
        system: str | None = None,
        tools: list | None = None,
        documents: list | None = None,
        prompt_cache: PromptCache | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.tools = tools
        self.documents = documents
        self.messages: list[dict[str, Any]] = []
        self.last_prefill_tokens = 0
        self.last_cached_tokens = 0
        if prompt_cache is None:
            budget = self.max_snapshots * state_bytes(model) + 256 * 2**20
            prompt_cache = PromptCache(budget)
        self.prompt_cache = prompt_cache
        self._cache: Cache = model.make_cache()
        self._ids: list[int] = []  # the tokens the live cache has consumed
        self._drafter: tuple | None = None  # (key, draft_model option, its Drafter)

    # --- the conversation ------------------------------------------------------------

    @classmethod
    def from_messages(
        cls,
        model: Model,
        tokenizer: Any,
        messages: Sequence[Mapping[str, Any]],
        system: str | None = None,
        tools: list | None = None,
        documents: list | None = None,
    ) -> ChatSession:
        """A session resuming ``messages``; the first turn prefills them all.

        A leading system message becomes ``system`` unless one is given.
        """
        session = cls(model, tokenizer, system=system, tools=tools, documents=documents)
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

    @property
    def context_tokens(self) -> int:
        """Tokens of the conversation held in the cache (what the next turn builds on)."""
        return len(self._ids)

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

    def _history(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + messages

    def _respond(
        self, messages: list[dict[str, Any]], options: dict[str, Any]
    ) -> Iterator[GenerationResponse]:
        """Answer ``messages`` (which end with the question), then record the answer."""
        reserved = [k for k in _RESERVED if k in options]
        if reserved:
            raise TypeError(f"ChatSession sets {', '.join(reserved)} itself; do not pass it")
        engine_options = {
            k: options.pop(k) for k in ("prefill_step_size", "cancel") if k in options
        }
        constraint = build_constraint(
            self.tokenizer, options.pop("response_format", None), self.tools,
            options.pop("tool_choice", None),
        )  # fmt: skip
        ids = encode_prompt(
            self.tokenizer, self._history(messages), tools=self.tools, documents=self.documents
        )
        held = len(self._ids)
        if 0 < held < len(ids) and ids[:held] == self._ids:
            cache, context, prompt = self._cache, self._ids, ids[held:]
        else:  # the engine resumes from the longest snapshot instead
            cache, context, prompt = self.model.make_cache(), [], ids
        request = make_request(
            prompt, cache=cache, context=context, tools=self.tools,
            snapshot_at=snapshot_points(self.tokenizer, ids), constraint=constraint,
            **self._with_drafter(options),
        )  # fmt: skip
        stream = run_request(
            self.model, self.tokenizer, request, prompt_cache=self.prompt_cache, **engine_options
        )
        # From here the live cache is this turn's: the next turn builds on what it holds.
        self._cache, self._ids = cache, []
        sampled: list[int] = []
        text: list[str] = []
        last = None
        failed = False
        try:
            for response in stream:
                if response.token is not None:
                    sampled.append(response.token)
                text.append(response.text)
                last = response
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
                self._cache = self.model.make_cache()
            else:
                self._ids = (ids + sampled)[: cache_length(cache)]
                self.messages = messages
                calls = last.tool_calls if last is not None and last.finish_reason else []
                self.messages.append(self._answer_message("".join(text), calls))
                if last is not None:
                    self.last_prefill_tokens = last.prompt_tokens
                    self.last_cached_tokens = last.cached_tokens

    def _with_drafter(self, options: dict[str, Any]) -> dict[str, Any]:
        """The same draft model keeps one drafter, and so its cache, from turn to
        turn: each turn it drafts after prefilling only what is new."""
        draft = options.get("draft_model")
        if draft is None:
            return options
        from .speculative import Drafter, make_drafter

        if isinstance(draft, Drafter):
            return options
        if isinstance(draft, tuple):
            key = ("model", id(draft[0]))
        elif isinstance(draft, str | os.PathLike):
            key = ("path", os.fspath(draft))
        else:
            key = ("model", id(draft))
        if self._drafter is None or self._drafter[0] != key:
            # The option is kept alongside, so the id in the key stays its own.
            self._drafter = (key, draft, make_drafter(draft))
        return {**options, "draft_model": self._drafter[2]}

    @staticmethod
    def _answer_message(text: str, calls: list) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        valid = [c.to_openai() for c in calls if c.valid]
        if valid:  # an invalid call cannot be rendered back; it was reported in the stream
            message["tool_calls"] = valid
        return message

    # --- saving ------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the conversation, the cache and its snapshots to one file (any name),
        atomically. `load` resumes it exactly: the next turn prefills only what is new.
        """
        # Snapshots on the conversation's path ride along as extra Mamba layers after
        # the real ones: their K/V is a prefix of the live cache's. The last few are
        # kept (before the last question, after it, the prompt but its last token:
        # enough to edit and to regenerate); each costs a whole Mamba2 state on disk.
        on_path = [n for n in self.prompt_cache.states(self._ids) if n < len(self._ids)]
        lengths = on_path[-self.saved_snapshots :]
        layers = list(self._cache)
        for n in lengths:
            found = self.prompt_cache.lookup(self._ids[:n])
            assert found is not None and found[0] == n
            layers += [c for c in found[1] if isinstance(c, MambaCache)]
        metadata = {
            "session": SESSION_FORMAT,
            "model": _architecture(self.model),
            "weights": _weights_id(self.model),
            "layers": len(self._cache),
            "system": self.system,
            "tools": self.tools,
            "documents": self.documents,
            "messages": self.messages,
            "ids": self._ids,
            "snapshots": lengths,
        }
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as exc:
            raise SessionError(f"Cannot save the session: a message is not JSON ({exc}).") from exc
        try:
            save_cache(path, layers, metadata)
        except (OSError, RuntimeError) as exc:  # MLX reports a full disk as RuntimeError
            raise SessionError(
                f"Cannot save the session to {path}: {exc}. Nothing was written there (an "
                "earlier save under that name is unchanged); free some space or pick another "
                "place."
            ) from exc

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model, tokenizer: Any) -> ChatSession:
        """Resume a session written by `save` with the same model (the same weights)."""
        try:
            layers, meta = load_cache(path)
        except CheckpointError as exc:
            raise SessionError(f"{exc} It is not a chat session this version can resume.") from exc
        if meta.get("session") != SESSION_FORMAT:
            raise SessionError(f"{path} is not a saved chat session (or one from an older "
                               "version): start the chat afresh.")  # fmt: skip
        if meta.get("model") != json.loads(json.dumps(_architecture(model))) or meta.get(
            "weights"
        ) != _weights_id(model):
            raise SessionError(f"{path} was saved with a different model; start the chat afresh.")
        _check_session(path, meta, layers, model)
        session = cls(
            model, tokenizer, system=meta.get("system"), tools=meta.get("tools"),
            documents=meta.get("documents"),
        )  # fmt: skip
        session.messages = list(meta["messages"])
        count = meta["layers"]
        cache, extra = layers[:count], iter(layers[count:])
        ids = list(meta["ids"])
        for n in meta["snapshots"]:
            snap: Cache = []
            for layer in cache:
                if isinstance(layer, KVCache):
                    c = KVCache()
                    c.keys, c.values = layer.keys[:, :, :n], layer.values[:, :, :n]
                    c.offset = n
                else:
                    c = next(extra)
                    c.offset = n
                snap.append(c)
            session.prompt_cache.insert(ids[:n], snap)
        for c in cache:
            c.offset = len(ids)
        session._cache, session._ids = cache, ids
        return session


def _weights_id(model: Model) -> str:
    from .loading import fingerprint_weights

    return fingerprint_weights(model)


def _check_session(path, meta: dict, layers: list, model: Model) -> None:
    """Refuse a session file whose parts disagree with each other or with the model."""

    def bad(why: str) -> SessionError:
        return SessionError(f"{path} is damaged ({why}); start the chat afresh.")

    for key, kind in (("messages", list), ("ids", list), ("snapshots", list), ("layers", int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise bad(f"'{key}' is missing or not a {kind.__name__}")
    for i, m in enumerate(meta["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"message {i} is not a {{'role', 'content'}} object")
    vocab = model.args.vocab_size
    ids = meta["ids"]
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise bad("its token ids are not ids of this model's vocabulary")
    count = meta["layers"]
    if count != len(model.layers) or len(layers) < count:
        raise bad(f"it holds {len(layers)} layers, the model has {len(model.layers)}")
    snaps = meta["snapshots"]
    if not all(isinstance(n, int) and 0 < n < len(ids) for n in snaps) or snaps != sorted(set(snaps)):
        raise bad("its snapshot positions are not increasing positions inside the conversation")
    mambas = sum(1 for layer in model.layers if layer.kind == "mamba")
    if len(layers) != count + mambas * len(snaps):
        raise bad("its snapshots do not match its layers")
    expect = cache_shapes(model)
    for i, layer in enumerate(layers):
        j = i if i < count else [k for k, lay in enumerate(model.layers) if lay.kind == "mamba"][
            (i - count) % mambas
        ]
        kind = model.layers[j].kind
        if (kind == "attention") != isinstance(layer, KVCache):
            raise bad(f"layer {j} is {kind} in the model but not in the file")
        arrays = layer.arrays
        if not arrays and (ids or i >= count):
            raise bad(f"layer {j} holds no state")
        for name, arr in arrays.items():
            want = expect[j][name]
            got = tuple(arr.shape)
            if name in ("keys", "values"):
                if got[:2] + got[3:] != want[:2] + want[3:] or got[2] != len(ids):
                    raise bad(f"layer {j} {name} have shape {got}, expected "
                              f"{want[:2] + (len(ids),) + want[3:]}")  # fmt: skip
            elif got != want:
                raise bad(f"layer {j} {name} has shape {got}, expected {want}")
    if ids and any(c.offset != len(ids) for c in layers[:count] if isinstance(c, KVCache)):
        raise bad("its cache length disagrees with its token ids")


def cache_shapes(model: Model) -> list[dict[str, tuple]]:
    """Per layer, the shape of each array a one-row cache holds (K/V with length 0)."""
    out = []
    for layer in model.layers:
        if layer.kind == "attention":
            a = layer.self_attn
            shape = (1, a.n_kv_heads, 0, a.head_dim)
            out.append({"keys": shape, "values": shape})
        else:
            m = layer.mamba
            out.append({
                "conv_state": (1, m.d_conv - 1, m.conv_dim),
                "ssm_state": (1, m.n_heads, m.head_dim, m.d_state),
            })  # fmt: skip
    return out

