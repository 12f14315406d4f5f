"""Request and response shapes of the OpenAI-compatible API (the parts conveyor serves)."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

# Lone UTF-16 surrogates: valid in JSON escapes (and so in Python strings), but not Unicode scalar values,
# so no tokenizer can encode them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid_unicode_path(value: Any) -> str | None:
    """The dotted path (surrogates escaped) of the first string or key in a parsed JSON value that holds a
    lone surrogate. Iterative: a deeply nested body must not exhaust the stack."""
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return _escaped(path)
            continue
        if isinstance(item, dict):
            children: Any = item.items()
        else:
            children = enumerate(item) if isinstance(item, list) else ()
        for key, child in children:
            child_path = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _SURROGATE.search(key):
                return _escaped(child_path)
            pending.append((child_path, child))
    return None


class _UnicodeChecked(BaseModel):
    """A request body whose every string must be valid Unicode text (checked once, on the raw body)."""

    @model_validator(mode="before")
    @classmethod
    def _reject_lone_surrogates(cls, data: Any) -> Any:
        path = invalid_unicode_path(data)
        if path is not None:
            raise PydanticCustomError("invalid_unicode", "{field}: not valid Unicode text (a lone surrogate)",
                                      {"field": path})
        return data


# Request fields of the OpenAI API (or of vLLM's extensions) not served yet. Until they are,
# a request that sets one (to anything but null) gets a 400 naming it: never a 200 that ignored it.
NOT_YET_SUPPORTED: tuple[str, ...] = (
    # vLLM's older structured-output fields (its `structured_outputs` is served), OpenAI's reasoning knobs
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "reasoning_effort", "include_reasoning",
)

# Request fields of the OpenAI API that conveyor does not serve, and why. Setting one (to anything but null or
# the neutral value in `NEUTRAL_VALUES`) gets a 400 naming it.
UNSUPPORTED: dict[str, str] = {
    "suffix": "the model has no fill-in-the-middle",
    "audio": "the model has no audio output", "modalities": "the model only writes text",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "there is no web search",
    "functions": "the deprecated function calling API is not served (use tools)",
    "function_call": "the deprecated function calling API is not served (use tool_choice)",
    "store": "completions are not stored", "metadata": "completions are not stored",
    "service_tier": "there are no service tiers", "verbosity": "the model has no verbosity control",
}
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "store": (False,), "service_tier": ("auto", "default"), "modalities": (["text"],), "suffix": ("",),
}


def _refuse_unserved_fields(data: Any) -> Any:
    """Reject a field of `NOT_YET_SUPPORTED` or `UNSUPPORTED` that is set; drop it when null or neutral (what
    some clients send for every field they know)."""
    if not isinstance(data, dict):
        return data
    for name in [key for key in data if key in UNSUPPORTED or key in NOT_YET_SUPPORTED]:
        value = data[name]
        if value is None or value in NEUTRAL_VALUES.get(name, ()):
            data = {key: item for key, item in data.items() if key != name}
            continue
        reason = UNSUPPORTED.get(name, "it is not supported yet")
        raise PydanticCustomError("unsupported_field", "{field}: not supported by this server: {reason}",
                                  {"field": name, "reason": reason})
    return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    # vLLM's extension: every chunk carries the usage so far.
    continuous_usage_stats: bool = False


class JSONSchemaFormat(BaseModel):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extension: exactly one of these constrains the output."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class SamplingFields(_UnicodeChecked):
    """Fields shared by completions and chat, with vLLM's common extensions. Any other field is refused."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unserved(cls, data: Any) -> Any:
        return _refuse_unserved_fields(data)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Token id (as a string, JSON keys are strings) -> a bias in [-100, 100] added to its logit.
    logit_bias: dict[str, float] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Identify the caller; they change nothing in what is generated (the prefix cache needs no key).
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @model_validator(mode="after")
    def _check_shared(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("stream_options", "{field}: only allowed when stream is true",
                                      {"field": "stream_options"})
        for key, bias in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise PydanticCustomError("logit_bias", "{field}: keys must be token ids, got {key!r}",
                                          {"field": "logit_bias", "key": key})
            if not -100.0 <= bias <= 100.0:
                raise PydanticCustomError("logit_bias", "{field}: biases must be in [-100, 100], got {bias} for "
                                          "token {key}", {"field": "logit_bias", "key": key, "bias": bias})
        return self


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int | None = Field(default=16, ge=1)
    best_of: int | None = Field(default=None, ge=1, le=16)

    @model_validator(mode="after")
    def _check_best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise PydanticCustomError("best_of", "{field}: best_of ({best_of}) must be at least n ({n})",
                                      {"field": "best_of", "best_of": self.best_of, "n": self.n})
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise PydanticCustomError("best_of", "{field}: best_of > n cannot be streamed (the best are known "
                                      "only at the end)", {"field": "best_of"})
        return self


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("top_logprobs", "{field}: needs logprobs set to true",
                                      {"field": "top_logprobs"})
        if self.max_completion_tokens is not None and self.max_tokens is not None \
                and self.max_completion_tokens != self.max_tokens:
            raise PydanticCustomError("max_completion_tokens", "{field}: max_tokens ({max_tokens}) and "
                                      "max_completion_tokens ({max_completion_tokens}) disagree; send one",
                                      {"field": "max_completion_tokens", "max_tokens": self.max_tokens,
                                       "max_completion_tokens": self.max_completion_tokens})
        return self


class TokenizeRequest(_UnicodeChecked):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True  # with messages, as in a chat completion
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_UnicodeChecked):
    model: str | None = None
    tokens: list[int]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """Every error the server answers, whatever its status."""

    error: ErrorDetail


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, error_type: str, status: int, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object. Message and param may quote the client's input: lone surrogates in it are
    escaped, or the answer itself could not be encoded."""
    return {"error": {"message": _escaped(message), "type": error_type,
                      "param": None if param is None else _escaped(param), "code": status}}
