"""TGI wire types: request models (pydantic, strict like serde) and response shapes (TypedDicts)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
I32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


class Grammar(BaseModel):
    """TGI's `GrammarType`: `json` (alias `json_object`; `value` a JSON Schema object or its JSON text;
    `json_object` without a value: any JSON object), `json_schema` (`value`: `{name?, schema}`), `regex`
    (`value`: the pattern, matched against the whole output)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["json", "json_object", "regex", "json_schema"]
    value: Any = None


class GenerateParameters(BaseModel):
    """TGI `GenerateParameters`: every field optional, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")
    adapter_id: str | None = None
    best_of: U32 | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Grammar | None = None
    max_new_tokens: U32 | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: U64 | None = None
    stop: list[str] | None = None
    temperature: float | None = None
    top_k: I32 | None = None
    top_n_tokens: U32 | None = None
    top_p: float | None = None
    truncate: U32 | None = None
    typical_p: float | None = None
    watermark: bool = False


def default_parameters() -> GenerateParameters:
    """What TGI applies when `parameters` is absent: sampling on."""
    return GenerateParameters(do_sample=True)


class GenerateRequest(BaseModel):
    """Body of `/generate`, `/generate_stream` and `/tokenize`."""

    model_config = ConfigDict(strict=True, extra="ignore")
    inputs: str
    parameters: GenerateParameters = Field(default_factory=default_parameters)


class CompatGenerateRequest(GenerateRequest):
    """Body of `POST /`: a `GenerateRequest` with a `stream` switch."""

    stream: bool = False


class Token(TypedDict):
    id: int
    text: str
    logprob: float
    special: bool


class PrefillToken(TypedDict):
    id: int
    text: str
    logprob: float | None


class BestOfSequence(TypedDict):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: NotRequired[list[list[Token]]]


class Details(TypedDict):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: NotRequired[list[list[Token]]]
    best_of_sequences: NotRequired[list[BestOfSequence]]


class GenerateResponse(TypedDict):
    generated_text: str
    details: NotRequired[Details]


class StreamDetails(TypedDict):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(TypedDict):
    index: int
    token: Token
    top_tokens: NotRequired[list[Token]]
    generated_text: str | None
    details: StreamDetails | None


class ErrorResponse(TypedDict):
    error: str
    error_type: str


class SimpleToken(TypedDict):
    id: int
    text: str
    start: int
    stop: int


class ChatTokenizeResponse(TypedDict):
    """`/chat_tokenize`: the chat template's output and its tokens."""

    tokenize_response: list[SimpleToken]
    templated_text: str


class Info(TypedDict):
    model_id: str
    model_sha: str | None
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_total_tokens: int | None
    """KV cache capacity in tokens (null until the cache is sized, when it is computed from free memory)."""
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
