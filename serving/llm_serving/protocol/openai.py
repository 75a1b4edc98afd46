"""OpenAI wire types as TGI accepts them, and their mapping to TGI `GenerateParameters`. Pure."""

from __future__ import annotations

from typing import Any, Literal, NotRequired

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr
from typing_extensions import TypedDict

from llm_serving.protocol.tgi import U32, U64, GenerateParameters, Grammar


class _Lenient(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class ContentPart(_Lenient):
    type: str
    text: str | None = None
    image_url: Any = None


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"
    """A JSON string (OpenAI), or the object itself."""


class MessageToolCall(_Lenient):
    """A tool call in an earlier assistant message."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, validation_alias=AliasChoices("parameters", "arguments")
    )
    """A JSON Schema of type object (TGI also reads it as `arguments`); None: no parameters."""
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionName


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text, with content parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    """OpenAI's `response_format` (`text`, `json_object`, `json_schema` with `json_schema: {name, schema,
    strict}`), or a TGI grammar (`json`, `regex`, `json_schema` with `value`) as TGI's chat route takes it."""

    type: Literal["text", "json_object", "json_schema", "json", "regex"]
    json_schema: JsonSchemaFormat | None = None
    value: Any = None

    def grammar(self) -> Grammar | None:
        """The TGI grammar it asks for (None: plain text). A `json_schema` without a schema is any object."""
        if self.type == "text":
            return None
        if self.type == "json_schema" and self.json_schema is not None:
            schema = self.json_schema.schema_
            if schema is None:
                return Grammar(type="json_object")
            return Grammar(type="json_schema", value={"name": self.json_schema.name, "schema": schema})
        if self.type == "json_schema":
            return Grammar(type="json_schema", value=self.value)
        if self.type == "regex":
            return Grammar(type="regex", value=self.value)
        return Grammar(type="json" if self.type == "json" else "json_object", value=self.value)


class _Sampling(_Lenient):
    """Fields shared by chat and completions requests."""

    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    max_tokens: U32 | None = None
    seed: U64 | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: U32 | None = None
    response_format: ResponseFormat | None = None
    _adapter: str | None = PrivateAttr(default=None)

    def select_adapter(self, adapter: str | None) -> None:
        """Run with the LoRA adapter `model` resolved to (the route decides; None: the base model)."""
        self._adapter = adapter

    def parameters(self, *, top_n_tokens: int | None = None) -> GenerateParameters:
        """TGI's mapping: temperature 0 means greedy, `presence_penalty + 2` is the repetition penalty."""
        greedy = self.temperature == 0.0
        repetition = self.repetition_penalty
        if repetition is None and self.presence_penalty is not None:
            repetition = self.presence_penalty + 2.0
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return GenerateParameters(
            do_sample=not greedy,
            temperature=None if greedy else self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=repetition,
            max_new_tokens=self.max_tokens,
            seed=self.seed,
            stop=stop,
            top_n_tokens=top_n_tokens,
            details=True,
            grammar=None if self.response_format is None else self.response_format.grammar(),
            adapter_id=self._adapter,
        )


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: U32 | None = None
    logprobs: bool | None = None
    top_logprobs: U32 | None = None
    logit_bias: list[float] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def parameters(self, *, top_n_tokens: int | None = None) -> GenerateParameters:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        top = self.top_logprobs if self.logprobs else None
        return super().parameters(top_n_tokens=top)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    suffix: str | None = None


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(TypedDict):
    name: str
    arguments: str


class ToolCallOut(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class ChatDelta(TypedDict):
    role: Literal["assistant"]
    content: str | None
    tool_calls: NotRequired[list[ToolCallOut]]


class DeltaFunction(TypedDict, total=False):
    name: str
    arguments: str


class DeltaToolCall(TypedDict):
    index: int
    id: NotRequired[str]
    type: NotRequired[Literal["function"]]
    function: DeltaFunction


class ChunkDelta(TypedDict):
    role: Literal["assistant"]
    content: NotRequired[str | None]
    tool_calls: NotRequired[list[DeltaToolCall]]


class TopLogprob(TypedDict):
    token: str
    logprob: float


class LogprobContent(TypedDict):
    token: str
    logprob: float
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(TypedDict):
    content: list[LogprobContent]


class ChatChoice(TypedDict):
    index: int
    message: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: str


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkChoice(TypedDict):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None


class CompletionChoice(TypedDict):
    index: int
    text: str
    logprobs: None
    finish_reason: str


class Completion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: NotRequired[Usage | None]


class ModelCard(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: NotRequired[str]
    """A LoRA adapter's base model (as vLLM lists adapters)."""


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[ModelCard]
