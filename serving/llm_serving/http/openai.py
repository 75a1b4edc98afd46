"""OpenAI routes: chat completions (template from the tokenizer), completions, models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llm_serving import openai_bodies
from llm_serving.errors import ServingError, TemplateError, ValidationError
from llm_serving.http.io import EventStream, read_json, sse_data, until_disconnect
from llm_serving.http.state import AppState
from llm_serving.protocol.openai import ChatRequest, CompletionRequest
from llm_serving.sampling.params import FrequencyRule
from llm_serving.service import GenerationService
from llm_serving.validation import ValidRequest


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.serving
    return state


def _model_name(state: AppState, requested: str | None) -> str:
    """TGI echoes the requested model unless it is absent or the placeholder "tgi"."""
    if requested is None or requested == "tgi":
        return state.model.model_id
    return requested


def _chat_prompt(service: GenerationService, body: ChatRequest) -> str:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        return str(
            service.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    except Exception as exc:
        raise TemplateError(f"Template error: {exc}") from exc


async def _chat_events(
    service: GenerationService, body: ChatRequest, model: str, created: int
) -> AsyncGenerator[str, None]:
    try:
        valid = await service.off_loop(lambda: _validate_chat(service, body))
        want = bool(body.logprobs)
        async with aclosing(service.stream(valid)) as items:
            async for item in items:
                yield sse_data(openai_bodies.chat_chunk(item.event, model, created, want))
                if item.final is not None and body.stream_options and body.stream_options.include_usage:
                    use = openai_bodies.usage(len(valid.input_ids), len(item.final.tokens))
                    yield sse_data(openai_bodies.chat_chunk(None, model, created, want, use))
    except ServingError as exc:
        yield sse_data(exc.openai_stream_body())
    yield sse_data("[DONE]")


def _validate_chat(service: GenerationService, body: ChatRequest) -> ValidRequest:
    if body.tools and body.response_format:
        raise ValidationError("Cannot use both `tools` and `response_format`")
    if body.response_format is not None and body.response_format.get("type") not in (None, "text"):
        raise ValidationError("grammar is not supported")
    prompt = _chat_prompt(service, body)
    return service.validate(
        prompt,
        body.parameters(),
        stream=body.stream,
        add_special_tokens=False,
        frequency_rule=FrequencyRule.OPENAI,
    )


async def chat_completions(request: Request) -> Response:
    state = _state(request)
    body = await read_json(request, ChatRequest, state.limits.max_body_bytes)
    service = state.ready_service()
    model, created = _model_name(state, body.model), int(time.time())
    if body.stream:
        return EventStream(_chat_events(service, body, model, created))
    valid = await service.off_loop(lambda: _validate_chat(service, body))
    result = await until_disconnect(request, service.generate(valid))
    return JSONResponse(openai_bodies.chat_completion(result, model, created, bool(body.logprobs)))


def _validate_completion(
    state: AppState, service: GenerationService, body: CompletionRequest
) -> list[ValidRequest]:
    if body.suffix is not None:
        raise ValidationError("Suffix is not supported and can be achieved by preprocessing the prompt.")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or len(prompts) > state.limits.max_client_batch_size:
        raise ValidationError(
            f"Number of prompts must be between 1 and {state.limits.max_client_batch_size}. "
            f"Given: {len(prompts)}"
        )
    params = body.parameters()
    return [
        service.validate(p, params, stream=body.stream, frequency_rule=FrequencyRule.OPENAI) for p in prompts
    ]


async def _completion_events(
    state: AppState, service: GenerationService, body: CompletionRequest, model: str, created: int
) -> AsyncGenerator[str, None]:
    try:
        valids = await service.off_loop(lambda: _validate_completion(state, service, body))
        for index, valid in enumerate(valids):
            async with aclosing(service.stream(valid)) as items:
                async for item in items:
                    use = None
                    if item.final is not None:
                        use = openai_bodies.usage(len(valid.input_ids), len(item.final.tokens))
                    yield sse_data(openai_bodies.completion_chunk(index, item.event, model, created, use))
    except ServingError as exc:
        yield sse_data(exc.openai_stream_body())
    yield sse_data("[DONE]")


async def completions(request: Request) -> Response:
    state = _state(request)
    body = await read_json(request, CompletionRequest, state.limits.max_body_bytes)
    service = state.ready_service()
    model, created = _model_name(state, body.model), int(time.time())
    if body.stream:
        return EventStream(_completion_events(state, service, body, model, created))
    valids = await service.off_loop(lambda: _validate_completion(state, service, body))
    work = asyncio.gather(*(service.generate(v) for v in valids))
    results = await until_disconnect(request, work)
    return JSONResponse(openai_bodies.completion(list(results), model, created))


async def models(request: Request) -> Response:
    return JSONResponse(openai_bodies.model_list(_state(request).model.model_id))
