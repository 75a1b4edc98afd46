"""TGI's validation rules, without a server."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from llm_serving.config import Limits
from llm_serving.errors import ValidationError
from llm_serving.protocol.openai import ChatRequest
from llm_serving.protocol.tgi import GenerateParameters, GenerateRequest
from llm_serving.sampling.params import FrequencyRule
from llm_serving.validation import as_float32, validate_input, validate_parameters

LIMITS = Limits(max_input_tokens=10, max_total_tokens=20)


def check(stream: bool = False, **fields: Any) -> Any:
    return validate_parameters(GenerateParameters(**fields), LIMITS, stream=stream, rng=random.Random(0))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": 0.0}, "`temperature` must be strictly positive"),
        ({"repetition_penalty": -1.0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": -2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 0.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a"] * 5}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"top_n_tokens": 9}, "`top_n_tokens` must be >= 0 and <= 5. Given: 9"),
        ({"truncate": 11}, "`truncate` must be strictly positive and less than 10. Given: 11"),
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
        ({"grammar": {"type": "json", "value": 5}}, "grammar is not supported"),
        ({"grammar": {"type": "json_schema", "value": {"name": "x"}}}, "grammar is not valid: `json_schema`"),
        ({"grammar": {"type": "json", "value": "{"}}, "grammar is not valid: the JSON schema is not JSON"),
        ({"temperature": 1e-300}, "`temperature` must be strictly positive"),
        ({"repetition_penalty": 1e-300}, "`repetition_penalty` must be strictly positive"),
        ({"top_p": 1e-300}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 1 - 1e-12}, "`typical_p` must be > 0.0 and < 1.0"),
        (
            {"temperature": math.inf},
            "`temperature` must be a finite float32 (at most 3.4028235e38). Given: inf",
        ),
        (
            {"repetition_penalty": 1e39},
            "`repetition_penalty` must be a finite float32 (at most 3.4028235e38)",
        ),
        ({"temperature": math.nan}, "`temperature` must be strictly positive"),
        ({"top_p": math.nan}, "`top_p` must be > 0.0 and < 1.0"),
        ({"frequency_penalty": math.nan}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ],
)
def test_rule_messages(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        check(**fields)
    assert info.value.text.startswith(f"Input validation error: {message}")
    assert info.value.status == 422
    assert info.value.error_type == "validation"


def test_stream_only_rules() -> None:
    with pytest.raises(ValidationError, match="not supported when streaming"):
        check(stream=True, best_of=2, do_sample=True)
    with pytest.raises(ValidationError, match="`decoder_input_details` == true"):
        check(stream=True, decoder_input_details=True)


def test_any_warper_implies_sampling_and_gets_a_seed() -> None:
    params = check(temperature=0.5)
    assert params.sampling.do_sample
    assert params.sampling.seed is not None
    greedy = check()
    assert not greedy.sampling.do_sample
    assert greedy.sampling.seed is None
    assert check(do_sample=True, seed=5).sampling.seed == 5


@pytest.mark.parametrize(
    "fields",
    [{"temperature": 1.0}, {"temperature": 1.0, "frequency_penalty": 1.0}, {"repetition_penalty": 2.0}],
)
def test_neutral_warpers_stay_greedy(fields: dict[str, Any]) -> None:
    """TGI's server samples only for `do_sample` or a warper off neutral: `temperature: 1.0` is greedy."""
    params = check(**fields)
    assert not params.sampling.do_sample
    assert params.sampling.seed is None


@pytest.mark.parametrize("fields", [{"top_k": 1}, {"top_p": 0.99}, {"typical_p": 0.5}, {"temperature": 0.9}])
def test_each_active_warper_samples(fields: dict[str, Any]) -> None:
    assert check(**fields).sampling.do_sample


def test_best_of_counts_any_given_warper_as_the_router_does() -> None:
    """TGI's router accepts `best_of` with an explicit `temperature: 1.0` (its `is_some` rule)."""
    assert check(best_of=2, temperature=1.0).best_of == 2
    with pytest.raises(ValidationError, match="you must use sampling when `best_of` is > 1"):
        check(best_of=2)


def test_openai_temperature_one_samples() -> None:
    """OpenAI's meaning: sampling by default, temperature 1 included; 0 is greedy."""
    for temperature in (None, 1.0):
        body = ChatRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], "temperature": temperature}
        )
        assert validate_parameters(body.parameters(), LIMITS, stream=False).sampling.do_sample
    cold = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "temperature": 0})
    assert not validate_parameters(cold.parameters(), LIMITS, stream=False).sampling.do_sample


def test_frequency_rule_follows_the_route() -> None:
    assert check(frequency_penalty=1.0).sampling.frequency_rule is FrequencyRule.TGI
    openai = validate_parameters(
        GenerateParameters(frequency_penalty=1.0), LIMITS, stream=False, frequency_rule=FrequencyRule.OPENAI
    )
    assert openai.sampling.frequency_rule is FrequencyRule.OPENAI


def test_absent_parameters_mean_sampling() -> None:
    assert GenerateRequest.model_validate({"inputs": "x"}).parameters.do_sample
    assert not GenerateRequest.model_validate({"inputs": "x", "parameters": {}}).parameters.do_sample


def test_lengths_truncation_and_default_budget() -> None:
    params = check()
    assert validate_input("x", [1, 2, 3], params, LIMITS).max_new_tokens == 17
    truncated = validate_input("x", list(range(15)), check(truncate=4, max_new_tokens=2), LIMITS)
    assert truncated.input_ids == (11, 12, 13, 14)
    with pytest.raises(ValidationError, match=r"must have less than 10 tokens\. Given: 11"):
        validate_input("x", list(range(11)), params, LIMITS)
    with pytest.raises(ValidationError, match="Given: 5 `inputs` tokens and 16 `max_new_tokens`"):
        validate_input("x", list(range(5)), check(max_new_tokens=16), LIMITS)
    with pytest.raises(ValidationError, match="`inputs` cannot be empty"):
        validate_input("", [], params, LIMITS)


def test_values_are_kept_as_float32() -> None:
    """What the sampler will use: a float32 subnormal is still positive; 0.1 is float32's 0.1."""
    sampling = check(temperature=1e-40, repetition_penalty=0.1, top_p=0.3).sampling
    assert 0 < sampling.temperature < 1.2e-38
    assert sampling.repetition_penalty == as_float32(0.1) != 0.1
    assert sampling.top_p == as_float32(0.3)
    assert as_float32(1e39) == math.inf
    assert as_float32(-1e39) == -math.inf
