"""Request bodies of both APIs, as pydantic models.

Validation here is what turns a bad request into a 400 that names the field
(``messages[2].tool_calls[0].function.arguments: ...``). Fields a client may send
but the server has no use for (``user``, ``metadata``, ``keep_alive``...) are
ignored, as the real APIs' own clients send plenty of them; fields whose meaning
we cannot honour (``n`` > 1, images, ``suffix``) are refused, never ignored.

Unions are validated by hand (``_one_of``) so that a wrong type gives one error
saying what the field accepts, rather than one error per union member.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# Validators raise ValueError even for a wrong type: pydantic turns only ValueError
# (and AssertionError) into a validation error; a TypeError would escape as a 500.


class FieldError(ValueError):
    """A problem found across fields, blamed on the one the client should change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(value)}")
        return [s for s in value if s]
    raise ValueError("must be a string or a list of strings")


StopList = Annotated[list[str], BeforeValidator(_stop_list)]


def _no_suffix(value: Any) -> Any:
    if value:
        raise ValueError("is not supported (Granite has no fill-in-the-middle format)")
    return value


NoSuffix = Annotated[str | None, BeforeValidator(_no_suffix)]


# --------------------------------------------------------------------------
# OpenAI
# --------------------------------------------------------------------------


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any]

    @field_validator("arguments", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return value
        if not isinstance(value, str):
            raise ValueError("must be a JSON string (or an object)")  # noqa: TRY004
        try:
            parsed = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
        if not isinstance(parsed, dict):
            raise ValueError("must encode a JSON object")  # noqa: TRY004
        return value


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


def _text_content(value: Any) -> str | list[dict[str, str]] | None:
    """A message's content: a string, None, or a list of text parts."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of content parts")  # noqa: TRY004
    parts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ValueError(f"part [{i}] must be an object with a 'type'")  # noqa: TRY004
        if part["type"] not in ("text", "input_text"):
            raise ValueError(
                f"part [{i}] has type {part['type']!r}: this model reads text only; "
                "send text parts ({'type': 'text', 'text': ...})"
            )
        if not isinstance(part.get("text"), str):
            raise ValueError(f"part [{i}] needs a 'text' string")  # noqa: TRY004
        parts.append({"type": "text", "text": part["text"]})
    return parts


TextContent = Annotated[Any, BeforeValidator(_text_content)]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: TextContent = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role}")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(
                f"a {self.role} message needs 'content'"
                + (" (or 'tool_calls')" if self.role == "assistant" else "")
            )
        return self


class FunctionDef(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class JSONSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (
            self.json_schema is None or not self.json_schema.schema_
        ):
            raise FieldError(
                "json_schema", "type 'json_schema' needs json_schema.schema (an object)"
            )
        return self

    def as_dict(self) -> dict[str, Any]:
        """The OpenAI-shaped dict the library's structured output takes."""
        out: dict[str, Any] = {"type": self.type}
        if self.json_schema is not None:
            out["json_schema"] = self.json_schema.model_dump(by_alias=True, exclude_none=True)
        return out


def _tool_choice(value: Any) -> Any:
    if value is None or value in ("none", "auto", "required"):
        return value
    if (
        isinstance(value, dict)
        and value.get("type") == "function"
        and isinstance(value.get("function"), dict)
        and isinstance(value["function"].get("name"), str)
    ):
        return {"type": "function", "function": {"name": value["function"]["name"]}}
    raise ValueError(
        "must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


ToolChoice = Annotated[Any, BeforeValidator(_tool_choice)]


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    """Sampling fields both OpenAI endpoints share (plus vLLM's common extensions)."""

    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: StopList = Field(default_factory=list)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
        return value

    @field_validator("n")
    @classmethod
    def _one(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"only n=1 is supported (one answer per request), got {value}")
        return value

    @model_validator(mode="after")
    def _stream_options(self) -> Sampling:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "only allowed with stream=true")
        return self


class ChatCompletionRequest(Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "needs logprobs=true")
        choice = self.tool_choice
        if isinstance(choice, dict) or choice == "required":
            names = [t.function.name for t in self.tools or []]
            if not names:
                raise FieldError("tool_choice", f"{json.dumps(choice)} needs tools")
            if isinstance(choice, dict) and choice["function"]["name"] not in names:
                raise FieldError(
                    "tool_choice",
                    f"names {choice['function']['name']!r}, which is not in tools "
                    f"({', '.join(names)})",
                )
        return self


class CompletionRequest(Sampling):
    model: str
    prompt: Any
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: NoSuffix = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        """A string or a list of token ids; a list of one of those is unwrapped."""
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]
        if isinstance(value, str):
            if not value:
                raise ValueError("is empty")
            return value
        if isinstance(value, list) and value and all(type(t) is int for t in value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            raise ValueError(f"holds {len(value)} prompts; send one prompt per request")
        raise ValueError("must be a non-empty string or a non-empty list of token ids")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"only best_of=1 is supported, got {value}")
        return value


# --------------------------------------------------------------------------
# Ollama
# --------------------------------------------------------------------------


class OllamaOptions(_Body):
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    num_predict: int | None = None  # -1 (or -2): no limit
    stop: StopList = Field(default_factory=list)
    seed: int | None = None
    repeat_penalty: float | None = Field(default=None, gt=0)
    repeat_last_n: int | None = Field(default=None, ge=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)

    @field_validator("num_predict")
    @classmethod
    def _limit(cls, value: int | None) -> int | None:
        if value is not None and (value == 0 or value < -2):
            raise ValueError(f"must be at least 1, or -1 for no limit; got {value}")
        return value


class OllamaFunctionCall(_Body):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(_Body):
    function: OllamaFunctionCall


def _no_images(value: Any) -> Any:
    if value:
        raise ValueError("images are not supported: this model reads text only")
    return value


NoImages = Annotated[Any, BeforeValidator(_no_images)]


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: NoImages = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


def _check_format(value: Any) -> Any:
    if value in (None, "", "json") or isinstance(value, dict):
        return value or None
    raise ValueError("must be 'json' or a JSON Schema object")


OllamaFormat = Annotated[Any, BeforeValidator(_check_format)]


class _OllamaRequest(_Body):
    model: str
    format: OllamaFormat = None
    options: OllamaOptions = Field(default_factory=OllamaOptions)
    stream: bool = True

    def response_format(self) -> dict[str, Any] | None:
        """``format`` in the OpenAI shape the library's structured output takes."""
        if self.format is None:
            return None
        if self.format == "json":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": self.format}}


class OllamaChatRequest(_OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Tool] | None = None


class OllamaGenerateRequest(_OllamaRequest):
    prompt: str = ""
    system: str | None = None
    suffix: NoSuffix = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: NoImages = None

    @field_validator("template")
    @classmethod
    def _no_template(cls, value: str | None) -> str | None:
        if value:
            raise ValueError(
                "custom templates are not supported; send the full prompt with raw=true instead"
            )
        return value


class OllamaShowRequest(_Body):
    model: str | None = None
    name: str | None = None  # older clients

    @model_validator(mode="after")
    def _named(self) -> OllamaShowRequest:
        if not (self.model or self.name):
            raise FieldError("model", "this field is required")
        return self
