"""Build OpenAI response bodies and stream chunks from generation results. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from llm_serving.engine.request import FinishReason
from llm_serving.outputs import GenerationResult, TokenEvent
from llm_serving.protocol.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    ChunkDelta,
    Completion,
    ModelCard,
    ModelList,
    Usage,
)
from llm_serving.tools import (
    CallStart,
    ContentDelta,
    ToolCallParser,
    ToolEvent,
    ToolPlan,
    parse_output,
)

FINGERPRINT = "3.3.6-dev0-native"


def chat_finish_reason(reason: FinishReason, called: bool = False) -> str:
    """TGI maps `eos_token` to OpenAI's `stop`; the other reasons pass through. An answer that called tools
    ends with `tool_calls` unless it ran out of tokens."""
    if called and reason is not FinishReason.LENGTH:
        return "tool_calls"
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


def _message(text: str, tools: ToolPlan | None) -> ChatDelta:
    """The assistant message: the text, or (with tools) the calls parsed from it and the text around them."""
    if tools is None:
        return {"role": "assistant", "content": text}
    parsed = parse_output(text, tools.names)
    message: ChatDelta = {"role": "assistant", "content": parsed.content}
    if parsed.calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in parsed.calls
        ]
    return message


def chat_completion(
    result: GenerationResult,
    model: str,
    created: int,
    want_logprobs: bool,
    tools: ToolPlan | None = None,
) -> ChatCompletion:
    best = result.best
    message = _message(best.text, tools)
    return {
        "id": "",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs(best.tokens) if want_logprobs else None,
                "finish_reason": chat_finish_reason(best.finish_reason, "tool_calls" in message),
            }
        ],
        "usage": usage(len(result.request.input_ids), len(best.tokens)),
    }


def _chunk(model: str, created: int, use: Usage | None) -> ChatCompletionChunk:
    return {
        "id": "",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [],
        "usage": use,
    }


def _tool_delta(event: ToolEvent) -> ChunkDelta:
    if isinstance(event, ContentDelta):
        return {"role": "assistant", "content": event.text}
    if isinstance(event, CallStart):
        return {
            "role": "assistant",
            "tool_calls": [
                {
                    "index": event.index,
                    "id": event.id,
                    "type": "function",
                    "function": {"name": event.name, "arguments": ""},
                }
            ],
        }
    return {
        "role": "assistant",
        "tool_calls": [{"index": event.index, "function": {"arguments": event.text}}],
    }


class ToolChunks:
    """A chat stream with tools, as OpenAI delta chunks: content deltas, and for each call a chunk with its
    id and name, then its argument fragments; the last chunk carries the finish reason. A token whose text
    is held back gives no chunk; its log-probs ride on the next one."""

    def __init__(self, tools: ToolPlan, model: str, created: int, want_logprobs: bool) -> None:
        self._parser = ToolCallParser(tools.names)
        self._model, self._created, self._want = model, created, want_logprobs
        self._held: list[TokenEvent] = []
        self._called = False

    def chunks(self, event: TokenEvent) -> list[ChatCompletionChunk]:
        found = self._parser.feed(_content(event))
        final = event.finish_reason
        if final is not None:
            found += self._parser.finish()
        self._held.append(event)
        self._called = self._called or any(isinstance(e, CallStart) for e in found)
        if not found and final is None:
            return []
        end: ChunkDelta = {"role": "assistant"} if self._called else {"role": "assistant", "content": ""}
        deltas = [_tool_delta(e) for e in found] or [end]
        out = []
        for i, delta in enumerate(deltas):
            chunk = _chunk(self._model, self._created, None)
            last = i == len(deltas) - 1
            chunk["choices"] = [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": logprobs(self._held) if self._want and i == 0 else None,
                    "finish_reason": chat_finish_reason(final, self._called)
                    if last and final is not None
                    else None,
                }
            ]
            out.append(chunk)
        self._held = []
        return out


def chat_chunk(
    event: TokenEvent | None, model: str, created: int, want_logprobs: bool, use: Usage | None = None
) -> ChatCompletionChunk:
    """A delta chunk for `event`, or the usage-only chunk (no choices) when `event` is None."""
    chunk = _chunk(model, created, use)
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


def model_list(model_id: str, adapters: Sequence[str] = ()) -> ModelList:
    """The base model, then each LoRA adapter with the base as its `parent`."""
    base: ModelCard = {"id": model_id, "object": "model", "created": 0, "owned_by": model_id}
    cards: list[ModelCard] = [
        {"id": name, "object": "model", "created": 0, "owned_by": model_id, "parent": model_id}
        for name in adapters
    ]
    return {"object": "list", "data": [base, *cards]}
