"""Build OpenAI response bodies and stream chunks from generation results. Pure."""

from __future__ import annotations

from llm_serving.engine.request import FinishReason
from llm_serving.outputs import GenerationResult, TokenEvent
from llm_serving.protocol.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    Completion,
    ModelList,
    Usage,
)

FINGERPRINT = "3.3.6-dev0-native"


def chat_finish_reason(reason: FinishReason) -> str:
    """TGI maps `eos_token` to OpenAI's `stop`; the other reasons pass through."""
    return "stop" if reason is FinishReason.EOS_TOKEN else reason.value


def usage(prompt: int, completion: int) -> Usage:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _content(event: TokenEvent) -> str:
    return "" if event.token.special else event.token.text


def logprobs(events: list[TokenEvent]) -> ChoiceLogprobs:
    return {
        "content": [
            {
                "token": e.token.text,
                "logprob": e.token.logprob,
                "top_logprobs": [{"token": t.text, "logprob": t.logprob} for t in e.top],
            }
            for e in events
        ]
    }


def chat_completion(
    result: GenerationResult, model: str, created: int, want_logprobs: bool
) -> ChatCompletion:
    best = result.best
    return {
        "id": "",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": best.text},
                "logprobs": logprobs(best.tokens) if want_logprobs else None,
                "finish_reason": chat_finish_reason(best.finish_reason),
            }
        ],
        "usage": usage(len(result.request.input_ids), len(best.tokens)),
    }


def chat_chunk(
    event: TokenEvent | None, model: str, created: int, want_logprobs: bool, use: Usage | None = None
) -> ChatCompletionChunk:
    """A delta chunk for `event`, or the usage-only chunk (no choices) when `event` is None."""
    chunk: ChatCompletionChunk = {
        "id": "",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [],
        "usage": use,
    }
    if event is not None:
        reason = event.finish_reason
        chunk["choices"] = [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": _content(event)},
                "logprobs": logprobs([event]) if want_logprobs else None,
                "finish_reason": chat_finish_reason(reason) if reason is not None else None,
            }
        ]
    return chunk


def completion(results: list[GenerationResult], model: str, created: int) -> Completion:
    prompt = sum(len(r.request.input_ids) for r in results)
    generated = sum(len(r.best.tokens) for r in results)
    return {
        "id": "",
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [
            {"index": i, "text": r.best.text, "logprobs": None, "finish_reason": r.best.finish_reason.value}
            for i, r in enumerate(results)
        ],
        "usage": usage(prompt, generated),
    }


def completion_chunk(
    index: int, event: TokenEvent, model: str, created: int, use: Usage | None
) -> Completion:
    """TGI's quirks: `finish_reason` is "" until the last chunk, which carries the raw reason and usage."""
    reason = event.finish_reason.value if event.finish_reason is not None else ""
    chunk: Completion = {
        "id": "",
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": index, "text": _content(event), "logprobs": None, "finish_reason": reason}],
    }
    if use is not None:
        chunk["usage"] = use
    return chunk


def model_list(model_id: str) -> ModelList:
    return {
        "object": "list",
        "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}],
    }
