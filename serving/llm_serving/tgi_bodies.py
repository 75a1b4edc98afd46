"""Build TGI response bodies from generation results. Pure."""

from __future__ import annotations

from collections.abc import Callable

from llm_serving.outputs import Generation, GenerationResult, StreamItem, TokenEvent, TokenInfo
from llm_serving.protocol.tgi import (
    BestOfSequence,
    Details,
    GenerateResponse,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from llm_serving.validation import ValidRequest


def token(info: TokenInfo) -> Token:
    return {"id": info.id, "text": info.text, "logprob": info.logprob, "special": info.special}


def prefill(
    valid: ValidRequest, generation: Generation, decode_one: Callable[[int], str]
) -> list[PrefillToken]:
    """Prompt tokens with their log-probs (the first has none), only with `decoder_input_details`."""
    if not valid.params.decoder_input_details or generation.prompt_logprobs is None:
        return []
    logprobs: list[float | None] = [None, *generation.prompt_logprobs]
    return [
        {"id": i, "text": decode_one(i), "logprob": lp}
        for i, lp in zip(valid.input_ids, logprobs, strict=True)
    ]


def _top(events: list[TokenEvent]) -> list[list[Token]]:
    return [[token(t) for t in e.top] for e in events]


def full_text(valid: ValidRequest, text: str, return_full_text: bool) -> str:
    return valid.inputs + text if return_full_text else text


def _sequence(
    valid: ValidRequest, g: Generation, decode_one: Callable[[int], str], return_full_text: bool
) -> BestOfSequence:
    seq: BestOfSequence = {
        "generated_text": full_text(valid, g.text, return_full_text),
        "finish_reason": g.finish_reason.value,
        "generated_tokens": len(g.tokens),
        "seed": g.seed,
        "prefill": prefill(valid, g, decode_one),
        "tokens": [token(e.token) for e in g.tokens],
    }
    if valid.params.sampling.top_n_tokens:
        seq["top_tokens"] = _top(g.tokens)
    return seq


def generate_response(
    result: GenerationResult, decode_one: Callable[[int], str], return_full_text: bool
) -> GenerateResponse:
    """The `/generate` body (`POST /` wraps it in a list)."""
    valid, best = result.request, result.best
    response: GenerateResponse = {"generated_text": full_text(valid, best.text, return_full_text)}
    if valid.params.details:
        details: Details = {
            "finish_reason": best.finish_reason.value,
            "generated_tokens": len(best.tokens),
            "seed": best.seed,
            "prefill": prefill(valid, best, decode_one),
            "tokens": [token(e.token) for e in best.tokens],
        }
        if valid.params.sampling.top_n_tokens:
            details["top_tokens"] = _top(best.tokens)
        if result.others:
            details["best_of_sequences"] = [
                _sequence(valid, g, decode_one, return_full_text) for g in result.others
            ]
        response["details"] = details
    return response


def stream_response(
    valid: ValidRequest, item: StreamItem, index: int, return_full_text: bool
) -> StreamResponse:
    """One SSE event of `/generate_stream`; `generated_text` and `details` only on the last."""
    event: StreamResponse = {
        "index": index,
        "token": token(item.event.token),
        "generated_text": None,
        "details": None,
    }
    if item.event.top:
        event["top_tokens"] = [token(t) for t in item.event.top]
    final = item.final
    if final is not None:
        event["generated_text"] = full_text(valid, final.text, return_full_text)
        if valid.params.details:
            details: StreamDetails = {
                "finish_reason": final.finish_reason.value,
                "generated_tokens": len(final.tokens),
                "seed": final.seed,
                "input_length": len(valid.input_ids),
            }
            event["details"] = details
    return event
