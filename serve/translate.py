"""HTTP requests -> the engine's `Request`: prompt ids, sampling, limits, snapshot points.

Both APIs come down to the same `Job`: the prompt's token ids, the engine request, and
what the answer must report (tool calls, log-probabilities). The rules:

* Chat messages are rendered with the checkpoint's chat template, tools included.
* Every prompt (chat, or text that a client templated itself) asks the engine for
  snapshots at the message boundaries later requests resume from
  (`chat_format.snapshot_points`), so the prompt cache can serve any later request
  that shares those messages: a regenerated answer, an edited last question, a new
  chat over the same system prompt, an agent's rewritten tool result. (The engine
  itself keeps the end of every prompt and answer.)
* Without a token limit the answer may run to the end of the model's context.
* Sampling options become `SamplingParams`; OpenAI's frequency/presence penalties and
  ``logit_bias`` become mlx-lm logits processors.
* ``response_format``, ``tools`` and ``tool_choice`` become a structured-output
  constraint (`granite_mlx.constrain.build_constraint`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from granite_mlx.chat_format import (
    ChatFormatError,
    encode_prompt,
    render_prompt,
    snapshot_points,
)
from granite_mlx.constrain import build_constraint
from granite_mlx.engine import Request
from granite_mlx.errors import GraniteError
from granite_mlx.generate import encode_input
from granite_mlx.sampling import SamplingParams

from .errors import APIError
from .schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaMessage,
    OllamaOptions,
    Sampling,
)


@dataclass
class Job:
    """One request, ready for the engine."""

    request: Request
    prompt_ids: list[int]
    tools: bool = False  # report the answer's tool calls as calls (else as text)
    logprobs: bool = False
    top_logprobs: int = 0
    echo: str = ""  # prompt text to put before the answer (completions' echo)


class Translator:
    """Builds `Job`s for one model and tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, drafting: tuple | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = model.args.vocab_size
        self.context = model.args.max_position_embeddings or None
        # Speculative decoding (--draft-model / --prompt-lookup): a maker of one drafter
        # per request and the number of draft tokens (granite_mlx.speculative.drafter_factory).
        self.drafting = drafting

    # --- OpenAI -------------------------------------------------------------------

    def chat(self, body: ChatCompletionRequest) -> Job:
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        messages = [_openai_message(m) for m in body.messages]
        ids = self._encode_chat(messages, tools)
        limit = body.max_completion_tokens or body.max_tokens
        top = body.top_logprobs or 0
        fmt = body.response_format.as_dict() if body.response_format else None
        request = self._request(
            ids,
            (),
            limit,
            _openai_sampling(body),
            body.stop,
            self._openai_processors(body),
            top,
            self._constraint(
                fmt,
                tools,
                body.tool_choice,
                "response_format",
                body.parallel_tool_calls is not False,
            ),
        )
        return Job(request, ids, tools=bool(tools), logprobs=bool(body.logprobs), top_logprobs=top)

    def completion(self, body: CompletionRequest) -> Job:
        try:
            ids = encode_input(self.tokenizer, body.prompt)
        except GraniteError as exc:
            raise APIError(400, f"prompt: {exc}", param="prompt") from None
        top = body.logprobs or 0
        request = self._request(
            ids,
            (),
            body.max_tokens,
            _openai_sampling(body),
            body.stop,
            self._openai_processors(body),
            top,
            None,
        )
        echo = ""
        if body.echo:
            echo = body.prompt if isinstance(body.prompt, str) else self.tokenizer.decode(ids)
        return Job(request, ids, logprobs=body.logprobs is not None, top_logprobs=top, echo=echo)

    # --- Ollama -------------------------------------------------------------------

    def ollama_chat(self, body: OllamaChatRequest) -> Job:
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        ids = self._encode_chat([_ollama_message(m) for m in body.messages], tools)
        o = body.options
        request = self._request(
            ids,
            (),
            _ollama_limit(o),
            _ollama_sampling(o),
            o.stop,
            self._penalties(o.presence_penalty, o.frequency_penalty, None),
            0,
            self._constraint(body.response_format(), tools, None, "format"),
        )
        return Job(request, ids, tools=bool(tools))

    def ollama_generate(self, body: OllamaGenerateRequest) -> Job:
        if body.raw:
            text = body.prompt
            if body.system:
                raise APIError(
                    400, "system: not used with raw=true; put it in the prompt", param="system"
                )
            ids = self._encode_text(text, "prompt")
        else:
            messages = [{"role": "system", "content": body.system}] if body.system else []
            messages.append({"role": "user", "content": body.prompt})
            if body.context:
                # Continue an earlier answer: only this turn is rendered after it.
                turn = self._turn_text(messages)
                ids = list(self.tokenizer.encode(turn, add_special_tokens=False))
            else:
                ids = self._encode_chat(messages, None)
        extra = ()
        if body.context:
            bad = next((t for t in body.context if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise APIError(
                    400,
                    f"context: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
                    param="context",
                )
            ids = list(body.context) + ids
            extra = (len(body.context),)  # where the earlier answer ended
        o = body.options
        request = self._request(
            ids,
            extra,
            _ollama_limit(o),
            _ollama_sampling(o),
            o.stop,
            self._penalties(o.presence_penalty, o.frequency_penalty, None),
            0,
            self._constraint(body.response_format(), None, None, "format"),
        )
        return Job(request, ids)

    # --- shared -------------------------------------------------------------------

    def _encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[int]:
        try:
            return encode_prompt(self.tokenizer, messages, tools=tools)
        except ChatFormatError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None

    def _encode_text(self, text: str, field: str) -> list[int]:
        try:
            return encode_input(self.tokenizer, text)
        except GraniteError as exc:
            raise APIError(400, f"{field}: {exc}", param=field) from None

    def _turn_text(self, messages: list[dict[str, Any]]) -> str:
        """The user turn alone (and the generation prompt), to follow an earlier context.

        The format always opens with a system turn (a default one when none is given),
        which the earlier context already holds: it is cut off.
        """
        system = (
            messages[0] if messages[0]["role"] == "system" else {"role": "system", "content": ""}
        )
        try:
            full = render_prompt(self.tokenizer, messages)
            head = render_prompt(self.tokenizer, [system], add_generation_prompt=False)
        except ChatFormatError as exc:
            raise APIError(400, f"prompt: {exc}", param="prompt") from None
        return full.removeprefix(head)

    def _request(
        self,
        ids: list[int],
        extra_snapshots: Sequence[int],
        max_tokens: int | None,
        sampling: SamplingParams,
        stop: Sequence[str],
        processors: list,
        top_logprobs: int,
        constraint: Any,
    ) -> Request:
        if self.context:
            room = max(self.context - len(ids), 1)  # no room: the engine refuses the prompt
            max_tokens = room if max_tokens is None else min(max_tokens, room)
        try:
            sampling.check(self.vocab_size)
        except GraniteError as exc:
            raise APIError(400, str(exc)) from None
        drafter, k = None, 4
        if self.drafting is not None and constraint is None:  # the engine cannot do both
            make, k = self.drafting
            drafter = make()
        return Request(
            prompt=ids,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=tuple(stop),
            logits_processors=tuple(processors),
            top_logprobs=top_logprobs,
            constraint=constraint,
            snapshot_at=snapshot_points(self.tokenizer, ids, extra_snapshots),
            drafter=drafter,
            num_draft_tokens=k,
        )

    def _openai_processors(self, body: Sampling) -> list:
        return self._penalties(body.presence_penalty, body.frequency_penalty, body.logit_bias)

    def _penalties(
        self, presence: float | None, frequency: float | None, bias: Mapping[str, float] | None
    ) -> list:
        logit_bias = None
        if bias:
            logit_bias = {int(k): float(v) for k, v in bias.items()}
            bad = next((t for t in logit_bias if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise APIError(
                    400,
                    f"logit_bias: token id {bad} is outside the vocabulary "
                    f"(0..{self.vocab_size - 1})",
                    param="logit_bias",
                )
        if not (presence or frequency or logit_bias):
            return []
        from mlx_lm.sample_utils import make_logits_processors

        return make_logits_processors(
            logit_bias=logit_bias,
            presence_penalty=presence or None,
            frequency_penalty=frequency or None,
        )

    def _constraint(
        self,
        response_format: dict[str, Any] | None,
        tools: list | None,
        tool_choice: Any,
        field: str,
        parallel_tool_calls: bool = True,
    ) -> Any:
        """The structured-output constraint, or None when nothing is constrained.

        Tools alone constrain nothing (the model writes calls freely and they are
        parsed); a ``tool_choice`` constrains them: "auto" once a call has started,
        "required" or a named function from the first token, "none" forbids calls.
        """
        wants_format = response_format is not None and response_format["type"] != "text"
        if not (wants_format or (tools and tool_choice is not None)):
            return None
        try:
            return build_constraint(
                self.tokenizer, response_format, tools, tool_choice,
                parallel_tool_calls=parallel_tool_calls,
            )  # fmt: skip
        except GraniteError as exc:
            where = field if wants_format else "tools"
            raise APIError(400, f"{where}: {exc}", param=where) from None


# --------------------------------------------------------------------------
# Field conversions
# --------------------------------------------------------------------------

def _openai_message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    if m.content is not None:
        out["content"] = m.content
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                # A JSON string goes in verbatim: it is what the model wrote (as we sent it).
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _ollama_message(m: OllamaMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in m.tool_calls
        ]
    return out


def _openai_sampling(body: Sampling) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
    )


def _ollama_sampling(o: OllamaOptions) -> SamplingParams:
    return SamplingParams(
        temperature=0.8 if o.temperature is None else o.temperature,  # Ollama's defaults
        top_p=0.9 if o.top_p is None else o.top_p,
        top_k=40 if o.top_k is None else o.top_k,
        min_p=o.min_p or 0.0,
        repetition_penalty=o.repeat_penalty,
        repetition_context_size=o.repeat_last_n or 64,
        seed=o.seed,
    )


def _ollama_limit(o: OllamaOptions) -> int | None:
    return None if o.num_predict is None or o.num_predict < 0 else o.num_predict
