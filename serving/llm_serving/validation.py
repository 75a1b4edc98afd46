"""TGI's validation rules: raw parameters -> `ValidParameters`, or a `ValidationError` with TGI's message."""

from __future__ import annotations

import json
import math
import random
import struct
from collections.abc import Collection
from dataclasses import dataclass, replace

from llm_serving.adapters import tgi_adapter
from llm_serving.config import Limits
from llm_serving.errors import ValidationError
from llm_serving.protocol.tgi import GenerateParameters, Grammar
from llm_serving.sampling.grammar import GrammarError
from llm_serving.sampling.params import FrequencyRule, GrammarSpec, SamplingParams


@dataclass(frozen=True)
class ValidParameters:
    """Parameters that passed every rule that does not need the token count."""

    sampling: SamplingParams
    max_new_tokens: int | None
    stop: tuple[str, ...]
    best_of: int
    truncate: int | None
    details: bool
    decoder_input_details: bool
    return_full_text: bool | None
    adapter: str | None = None
    """The LoRA adapter to run with (None: the base model)."""


@dataclass(frozen=True)
class ValidRequest:
    """A fully validated request: token ids, resolved budget and parameters."""

    inputs: str
    input_ids: tuple[int, ...]
    max_new_tokens: int
    params: ValidParameters


def as_float32(value: float) -> float:
    """`value` as the sampler's float32 tensors hold it: rounded, tiny values 0, huge ones infinite."""
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)


def _check_positive(name: str, value: float | None) -> float:
    """TGI's "strictly positive" rule, applied to the float32 value (1e-300 is 0 there); finite too."""
    if value is None:
        return 1.0
    f32 = as_float32(value)
    if not f32 > 0.0:
        raise ValidationError(f"`{name}` must be strictly positive")
    if math.isinf(f32):
        raise ValidationError(f"`{name}` must be a finite float32 (at most 3.4028235e38). Given: {value:g}")
    return f32


def _check_open_unit(name: str, value: float | None) -> float:
    if value is None:
        return 1.0
    f32 = as_float32(value)
    if not 0.0 < f32 < 1.0:
        raise ValidationError(f"`{name}` must be > 0.0 and < 1.0")
    return f32


def _schema_text(schema: object) -> str:
    """A JSON Schema given as an object or as its JSON text, as JSON text (a string is parsed, like TGI)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise GrammarError(f"the JSON schema is not JSON: {exc}") from None
    return json.dumps(schema, ensure_ascii=False)


def grammar_spec(grammar: Grammar) -> GrammarSpec:
    """TGI's `grammar` (or an OpenAI `response_format` mapped to it) as the engine's `GrammarSpec`; the
    grammar itself is compiled (and checked) by `llm_serving.sampling.grammar`. Pure."""
    if grammar.type == "regex":
        if not isinstance(grammar.value, str):
            raise GrammarError("a regex must be a string")
        return GrammarSpec("regex", grammar.value)
    if grammar.type == "json_schema":
        if not isinstance(grammar.value, dict) or "schema" not in grammar.value:
            raise GrammarError("`json_schema` needs a `schema`")
        return GrammarSpec("json_schema", _schema_text(grammar.value["schema"]))
    if grammar.value is None and grammar.type == "json_object":
        return GrammarSpec("json_object")
    if not isinstance(grammar.value, dict | str):
        raise ValidationError("grammar is not supported")  # TGI's answer to a JSON value of another type
    return GrammarSpec("json_schema", _schema_text(grammar.value))


def validate_parameters(
    p: GenerateParameters,
    limits: Limits,
    *,
    stream: bool,
    frequency_rule: FrequencyRule = FrequencyRule.TGI,
    rng: random.Random | None = None,
    adapters: Collection[str] = (),
) -> ValidParameters:
    """Apply every rule of TGI's `validate()` that does not need the tokenized input.

    `frequency_rule` is the API's meaning of `frequency_penalty` (TGI routes: TGI's; OpenAI routes: OpenAI's).
    As in TGI, the router's `best_of` rule counts any warper that is given, while the request samples when
    `do_sample` is set or a warper differs from its neutral value (TGI's `NextTokenChooser`): an explicit
    `temperature: 1.0` alone is greedy. `adapter_id`, when given, must name one of the loaded `adapters`.
    """
    warper_given = any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    best_of = 1 if p.best_of is None else p.best_of
    if best_of != 1 and stream:
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    if best_of > 1 and not (p.do_sample or warper_given):
        raise ValidationError("you must use sampling when `best_of` is > 1")
    if not 0 < best_of <= limits.max_best_of:
        raise ValidationError(f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}")
    if best_of > 1 and p.seed is not None:
        raise ValidationError("`seed` must not be set when `best_of` > 1")
    if p.decoder_input_details and stream:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
    temperature = _check_positive("temperature", p.temperature)
    repetition_penalty = _check_positive("repetition_penalty", p.repetition_penalty)
    frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
    if not -2.0 <= frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    top_p = _check_open_unit("top_p", p.top_p)
    typical_p = _check_open_unit("typical_p", p.typical_p)
    top_k = 0 if p.top_k is None else p.top_k
    if p.top_k is not None and top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    if p.max_new_tokens == 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    stop = tuple(p.stop or ())
    if len(stop) > limits.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(stop)}"
        )
    top_n = p.top_n_tokens or 0
    if top_n > limits.max_top_n_tokens:
        raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {top_n}")
    if p.truncate is not None and not 0 < p.truncate <= limits.max_input_tokens:
        raise ValidationError(
            f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. "
            f"Given: {p.truncate}"
        )
    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        typical_p=typical_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        frequency_rule=frequency_rule,
        watermark=p.watermark,
        top_n_tokens=top_n,
        grammar=None if p.grammar is None else grammar_spec(p.grammar),
    )
    sampling = p.do_sample or params.warps
    seed = p.seed
    if seed is None and sampling and best_of == 1:
        seed = (rng or random.Random()).getrandbits(63)
    params = replace(params, do_sample=sampling, seed=seed)
    return ValidParameters(
        sampling=params,
        max_new_tokens=p.max_new_tokens,
        stop=stop,
        best_of=best_of,
        truncate=p.truncate,
        details=p.details,
        decoder_input_details=p.decoder_input_details,
        return_full_text=p.return_full_text,
        adapter=tgi_adapter(p.adapter_id, adapters),
    )


def check_input_length(n: int, limits: Limits) -> None:
    """TGI's `max_input_tokens` rule for `n` input tokens."""
    if n > limits.max_input_tokens:
        raise ValidationError(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {n}")


def validate_input(
    inputs: str, input_ids: list[int], params: ValidParameters, limits: Limits
) -> ValidRequest:
    """Check the tokenized input against the length limits; truncate (left) and resolve `max_new_tokens`."""
    if not inputs:
        raise ValidationError("`inputs` cannot be empty")
    ids = input_ids[-params.truncate :] if params.truncate is not None else input_ids
    n = len(ids)
    check_input_length(n, limits)
    max_new = params.max_new_tokens
    if max_new is None:
        max_new = limits.max_total_tokens - n
    if n + max_new > limits.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {n} `inputs` tokens and {max_new} `max_new_tokens`"
        )
    if n == 0:
        raise ValidationError("`inputs` cannot be empty")
    return ValidRequest(inputs=inputs, input_ids=tuple(ids), max_new_tokens=max_new, params=params)
