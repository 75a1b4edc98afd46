"""TGI's response headers: Rust's float text, the timing headers of one answer, the sums over prompts."""

from __future__ import annotations

import pytest

from llm_serving.config import Limits
from llm_serving.outputs import Generation, GenerationResult, TokenEvent, TokenInfo
from llm_serving.protocol.tgi import GenerateParameters
from llm_serving.tgi_headers import generate_headers, rust_float, summed_headers
from llm_serving.validation import validate_input, validate_parameters


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1"),
        (0.0, "0"),
        (2.5, "2.5"),
        (0.1 + 0.2, "0.30000000000000004"),
        (1e-05, "0.00001"),
        (1e21, "1000000000000000000000"),
        (0.059157896997, "0.059157896997"),
    ],
)
def test_floats_are_written_as_rust_writes_an_f64(value: float, text: str) -> None:
    assert rust_float(value) == text


def _result(
    inputs: str, prompt_ids: list[int], generated: int, queue: float, total: float
) -> GenerationResult:
    params = validate_parameters(GenerateParameters(), Limits(), stream=False)
    valid = validate_input(inputs, prompt_ids, params, Limits())
    token = TokenEvent(request_id=1, token=TokenInfo(5, "a", -0.1, False), top=(), finish_reason=None)
    return GenerationResult(valid, Generation(tokens=[token] * generated, queue_time=queue), (), total)


def test_generate_headers_count_from_the_requests_start() -> None:
    headers = generate_headers(_result("héllo", [1, 2], 4, queue=0.25, total=1.25), "gpu+optimized", 0.5)
    assert headers == {
        "x-compute-type": "gpu+optimized",
        "x-compute-time": "1.75",
        "x-compute-characters": "5",  # code points, as Rust's chars().count()
        "x-total-time": "1750",
        "x-validation-time": "500",
        "x-queue-time": "250",
        "x-inference-time": "1000",
        "x-time-per-token": "250",
        "x-prompt-tokens": "2",
        "x-generated-tokens": "4",
    }


def test_completions_sum_the_integer_headers_and_drop_the_compute_time() -> None:
    one = generate_headers(_result("ab", [1], 2, queue=0.0, total=0.5), "cpu+optimized", 0.0)
    two = generate_headers(_result("cde", [1, 2, 3], 3, queue=0.125, total=0.75), "cpu+optimized", 0.0)
    summed = summed_headers([one, two])
    assert "x-compute-time" not in summed
    assert summed["x-compute-type"] == "cpu+optimized"
    assert (summed["x-compute-characters"], summed["x-prompt-tokens"], summed["x-generated-tokens"]) == (
        "5",
        "4",
        "5",
    )
    assert summed["x-total-time"] == str(500 + 750)
