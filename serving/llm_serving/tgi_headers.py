"""TGI's response headers: the `x-compute-*` and timing headers of `/generate` (and of the OpenAI routes, as
TGI sends them there) and the headers of a stream. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from llm_serving.outputs import GenerationResult

SUMMED = (
    "x-compute-characters",
    "x-total-time",
    "x-validation-time",
    "x-queue-time",
    "x-inference-time",
    "x-time-per-token",
    "x-prompt-tokens",
    "x-generated-tokens",
)
"""The integer headers TGI adds up over the prompts of one `/v1/completions` request."""


def rust_float(value: float) -> str:
    """`value` as Rust's `f64::to_string` writes it: shortest digits that read back, no exponent, no `.0`."""
    text = format(Decimal(repr(value)), "f")
    return text[:-2] if text.endswith(".0") else text


def _ms(seconds: float) -> str:
    """Whole milliseconds, truncated (Rust's `Duration::as_millis`)."""
    return str(int(max(0.0, seconds) * 1000))


def stream_headers(compute_type: str, characters: int) -> dict[str, str]:
    """What TGI sends on a stream besides the SSE headers (`characters`: of the prompt, in code points)."""
    return {"x-compute-type": compute_type, "x-compute-characters": str(characters)}


def generate_headers(
    result: GenerationResult, compute_type: str, validation_seconds: float
) -> dict[str, str]:
    """`/generate`'s headers: times in milliseconds from the request's start (validation included), but
    `x-compute-time` in seconds; the prompt and generated token counts of the best sequence."""
    best = result.best
    total = validation_seconds + result.total_time
    inference = max(0.0, result.total_time - best.queue_time)
    return {
        "x-compute-type": compute_type,
        "x-compute-time": rust_float(total),
        "x-compute-characters": str(len(result.request.inputs)),
        "x-total-time": _ms(total),
        "x-validation-time": _ms(validation_seconds),
        "x-queue-time": _ms(best.queue_time),
        "x-inference-time": _ms(inference),
        "x-time-per-token": _ms(inference / max(1, len(best.tokens))),
        "x-prompt-tokens": str(len(result.request.input_ids)),
        "x-generated-tokens": str(len(best.tokens)),
    }


def summed_headers(per_prompt: Sequence[dict[str, str]]) -> dict[str, str]:
    """`/v1/completions` over several prompts: the first's `x-compute-type`, the integer headers summed
    (TGI sends no `x-compute-time` there)."""
    headers = {"x-compute-type": per_prompt[0]["x-compute-type"]} if per_prompt else {}
    for name in SUMMED:
        headers[name] = str(sum(int(h[name]) for h in per_prompt))
    return headers
