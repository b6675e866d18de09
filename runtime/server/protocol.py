"""OpenAI-compatible protocol models (pydantic), requests and responses.

Requests are validated here, once. Unknown fields are ignored and logged once
per name (as vLLM does: new SDK versions send fields older servers never heard
of); OpenAI fields we know but do not implement are rejected by name when they
ask for something (tools, images, ...), and accepted in their null/empty form.
Failures raise InvalidParameter naming the field (errors.to_bad_request). Each request
knows how to become `SamplingParams`; responses are plain models that serialise
to exactly the JSON the OpenAI SDK parses.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from ..sampling_params import SamplingParams
from ..structured.params import StructuredOutputsParams
from .errors import InvalidParameter

logger = logging.getLogger("fleetserve.server")
_ignored_logged: set[str] = set()


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    @model_validator(mode="after")
    def _ignore_unknown(self):
        for name in self.model_extra or ():
            key = f"{type(self).__name__}.{name}"
            if key not in _ignored_logged:  # once per name: clients send the same extras on every request
                _ignored_logged.add(key)
                logger.warning(
                    "ignoring unknown request field %r in %s (logged once)", name, type(self).__name__
                )
        return self


# A request problem that names its field: errors.to_bad_request turns it into a 400 with that param.
_FieldError = InvalidParameter


class JsonSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    """Accepted; the output always follows the schema exactly (xgrammar strict mode)."""


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class _NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: _NamedFunction


class StreamOptions(_Request):
    include_usage: bool = False
    """Send one more chunk before [DONE] with the request's usage and no choices."""
    continuous_usage_stats: bool = False
    """vLLM extra: put the usage so far in every chunk."""


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras (the OpenAI SDK sends them through extra_body)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    """Accepted for vLLM compatibility; xgrammar is the only backend."""

    def structured_constraint(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """The request's output constraint and the field that set it; ValueError (with the
        field) when the fields are contradictory or malformed."""
        given: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None and rf.type != "text":
            if rf.type == "json_object":
                given.append(("response_format", dict(json_object=True)))
            else:
                if rf.json_schema is None:
                    raise _FieldError(
                        "response_format.json_schema",
                        "response_format of type json_schema needs a json_schema object (name, schema)",
                    )
                schema = rf.json_schema.schema_
                given.append(
                    (
                        "response_format.json_schema.schema",
                        dict(json=schema) if schema is not None else dict(json_object=True),
                    )
                )
        if self.structured_outputs is not None:
            given.append(("structured_outputs", self.structured_outputs))
        for name, key in (
            ("guided_json", "json"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ):
            value = getattr(self, name)
            if value is not None:
                given.append((name, {key: value}))
        if not given:
            return None, None
        if len(given) > 1:
            raise _FieldError(
                given[1][0],
                "give only one of response_format, structured_outputs and guided_*: got "
                + ", ".join(g[0] for g in given),
            )
        field, spec = given[0]
        try:
            return StructuredOutputsParams.model_validate(spec), field
        except ValueError as e:
            msg = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
            loc = e.errors()[0].get("loc") if hasattr(e, "errors") else None
            raise _FieldError(
                field + ("." + ".".join(map(str, loc)) if loc and field == "structured_outputs" else ""),
                f"{field}: {msg.removeprefix('Value error, ')}",
            ) from None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        if v is None:
            return v
        for k in v:
            try:
                int(k)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise InvalidParameter("stream_options", "stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        defaults: dict | None = None,
    ) -> SamplingParams:
        # The model's defaults (generation_config.json) fill in what the request leaves out.
        kw: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if k != "max_tokens"}
        kw.update(
            n=self.n,
            max_tokens=max_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            seed=self.seed,
        )
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        if self.logit_bias:
            kw["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        return SamplingParams(**kw)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.suffix:
            raise InvalidParameter("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidParameter("best_of", "best_of different from n is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [[]]  # one empty prompt: runtime/validation.validate refuses it
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self, max_tokens: int | None, defaults: dict | None = None) -> SamplingParams:
        prompt_lp = self.logprobs if (self.echo and self.logprobs is not None) else None
        return self._sampling_params(max_tokens, self.logprobs, prompt_lp, defaults)


class TextContent(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str
    """JSON text of the arguments, as OpenAI sends it."""


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContent] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    """Assistant messages: the calls it made (sent back in the history; null or [] means none)."""
    tool_call_id: str | None = None
    """Tool messages: the call this is the result of."""
    reasoning_content: str | None = None
    """Assistant messages: reasoning returned earlier (not rendered back: templates drop it)."""
    # What else the SDK sends back when a response message is put into the history as it is.
    refusal: str | None = None
    function_call: Any | None = None
    audio: Any | None = None
    annotations: list[Any] | None = None

    @model_validator(mode="after")
    def _off_forms_only(self):
        for name in ("function_call", "audio"):  # tool_calls are served (tools support)
            if getattr(self, name):
                raise InvalidParameter(name, f"{name} in messages is not supported by this server")
        if self.role == "tool" and not self.tool_call_id:
            raise InvalidParameter("tool_call_id", "a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise InvalidParameter("tool_calls", "only assistant messages carry tool_calls")
        return self

    @property
    def template_role(self) -> str:
        """The role as chat templates know it: OpenAI's "developer" is their "system"."""
        return "system" if self.role == "developer" else self.role

    def for_template(self) -> dict:
        """The message as HF chat templates read it: arguments as objects (templates index into
        them or pass them through tojson), tool results with their call id."""
        d: dict[str, Any] = {"role": self.template_role, "content": self.text()}
        if self.name:
            d["name"] = self.name
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                try:
                    args = json.loads(c.function.arguments) if c.function.arguments else {}
                except ValueError:
                    args = c.function.arguments  # not JSON: hand the text through
                calls.append(
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}}
                )
            d["tool_calls"] = calls
        if self.tool_call_id:
            d["tool_call_id"] = self.tool_call_id
        return d

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""  # a refusal is the assistant's turn as the client saw it
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


# Names the server passes to the chat template itself: a request's chat_template_kwargs may not set them.
_RESERVED_TEMPLATE_ARGS = frozenset(
    {"messages", "add_generation_prompt", "continue_final_message", "tokenize", "chat_template"}
)


class TemplateControlError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def chat_template_args(req) -> dict[str, Any]:
    """Keyword arguments for Tokenizer.apply_chat_template from a request's template controls
    (continue_final_message turns the default add_generation_prompt off). TemplateControlError
    (a ValueError naming the field) when they contradict each other or override the server's own."""
    if (
        req.continue_final_message
        and req.add_generation_prompt
        and "add_generation_prompt" in req.model_fields_set
    ):
        raise TemplateControlError(
            "continue_final_message and add_generation_prompt cannot both be true", "continue_final_message"
        )
    bad = sorted(_RESERVED_TEMPLATE_ARGS & set(req.chat_template_kwargs or {}))
    if bad:
        raise TemplateControlError(
            f"chat_template_kwargs may not set {', '.join(bad)}", "chat_template_kwargs"
        )
    return {
        **(req.chat_template_kwargs or {}),
        "continue_final_message": req.continue_final_message,
        "add_generation_prompt": req.add_generation_prompt and not req.continue_final_message,
    }


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    """vLLM extra: end the rendered prompt with the assistant turn's header."""
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """Default: "auto" when tools are given, else "none" (OpenAI)."""
    parallel_tool_calls: bool | None = None
    """False: at most one tool call per answer."""
    continue_final_message: bool = False
    """vLLM extra: end the prompt inside the last (assistant) message so the model continues it."""
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM extra: variables for the chat template (e.g. {"enable_thinking": false})."""
    # OpenAI fields that are accepted only in their "off" form.
    functions: list[Any] | None = None
    function_call: Any | None = None
    modalities: list[str] | None = None
    store: bool | None = None
    """Accepted and ignored: this server keeps no completions."""
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.functions:
            raise InvalidParameter("functions", "functions (deprecated) are not supported: use tools")
        if self.function_call not in (None, "none"):
            raise InvalidParameter(
                "function_call", "function_call (deprecated) is not supported: use tool_choice"
            )
        if self.modalities and self.modalities != ["text"]:
            raise InvalidParameter("modalities", "only the text modality is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParameter("top_logprobs", "top_logprobs requires logprobs to be true")
        return self

    def to_sampling_params(self, max_tokens: int | None, defaults: dict | None = None) -> SamplingParams:
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, lp, defaults=defaults)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def effective_tool_choice(self):
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def template_tools(self) -> list[dict] | None:
        """Tools as HF chat templates expect them (OpenAI's shape), unless tool_choice is none."""
        if not self.tools or self.effective_tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True, by_alias=True) for t in self.tools]

    def chat_messages(self) -> list[dict]:
        return [m.for_template() for m in self.messages]


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise InvalidParameter("prompt", "give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ----------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str = Field(default_factory=lambda: random_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)
    reasoning_content: str | None = None
    """Text of the model's reasoning block (--reasoning-parser), apart from the answer."""


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(BaseModel):
    """OpenAI's streamed tool call: the first delta of call `index` has id, type and name,
    the next ones argument fragments only."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        # OpenAI sends only the fields a delta carries; the last chunk's delta is {}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fleetserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
