"""OpenAI routes: chat completions (template from the tokenizer), completions, models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llm_serving import openai_bodies, tgi_headers, tools
from llm_serving.adapters import openai_adapter
from llm_serving.errors import (
    BatchSizeError,
    BodyTypeError,
    ServingError,
    SuffixError,
    TemplateError,
    ToolError,
)
from llm_serving.http.io import EventStream, read_json, sse_data, until_disconnect
from llm_serving.http.state import AppState
from llm_serving.protocol.openai import ChatRequest, CompletionRequest
from llm_serving.protocol.tgi import ChatTokenizeResponse, Grammar
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


def _adapter(state: AppState, requested: str | None) -> str | None:
    """The LoRA adapter `model` names (None: the base model); 404 `model_not_found` for an unknown one."""
    return openai_adapter(requested, state.model.model_id, state.model.adapters)


def _tool_plan(body: ChatRequest) -> tools.ToolPlan | None:
    """The request's tools, checked (a `ToolError` is a 422 before any answer starts)."""
    if body.tools and body.response_format and body.response_format.grammar() is not None:
        raise ToolError("Grammar and tools are mutually exclusive")  # TGI's words
    return tools.plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)


def _chat_prompt(service: GenerationService, body: ChatRequest) -> str:
    plan = _tool_plan(body)
    try:
        return tools.render_chat(service.tokenizer, body.messages, plan)
    except Exception as exc:
        raise TemplateError(f"Template error: {exc}") from exc


async def _chat_events(
    service: GenerationService, body: ChatRequest, prompt: str, model: str, created: int
) -> AsyncGenerator[str, None]:
    try:
        valid = await service.off_loop(lambda: _validate_chat(service, body, prompt))
        want = bool(body.logprobs)
        plan = _tool_plan(body)
        calls = None if plan is None else openai_bodies.ToolChunks(plan, model, created, want)
        async with aclosing(service.stream(valid)) as items:
            async for item in items:
                if calls is None:
                    chunks = [openai_bodies.chat_chunk(item.event, model, created, want)]
                else:
                    chunks = calls.chunks(item.event)
                for chunk in chunks:
                    yield sse_data(chunk)
                if item.final is not None and body.stream_options and body.stream_options.include_usage:
                    use = openai_bodies.usage(len(valid.input_ids), len(item.final.tokens))
                    yield sse_data(openai_bodies.chat_chunk(None, model, created, want, use))
    except ServingError as exc:
        yield sse_data(exc.openai_stream_body())
    yield sse_data("[DONE]")


def _validate_chat(service: GenerationService, body: ChatRequest, prompt: str) -> ValidRequest:
    params = body.parameters()
    plan = _tool_plan(body)
    schema = None if plan is None else plan.schema()
    if schema is not None:  # `required` / a named tool: the output is constrained to calls
        params.grammar = Grammar(type="json", value=schema)
    return service.validate(
        prompt,
        params,
        stream=body.stream,
        add_special_tokens=False,
        frequency_rule=FrequencyRule.OPENAI,
    )


async def chat_completions(request: Request) -> Response:
    state = _state(request)
    body = await read_json(request, ChatRequest, state.limits.max_body_bytes)
    service = state.ready_service()
    body.select_adapter(_adapter(state, body.model))
    model, created = _model_name(state, body.model), int(time.time())
    start = time.monotonic()
    # As TGI: the template is rendered before the answer starts (its errors are a 422, streamed or not).
    prompt = await service.off_loop(lambda: _chat_prompt(service, body))
    if body.stream:
        headers = tgi_headers.stream_headers(state.compute_type, len(prompt))
        return EventStream(_chat_events(service, body, prompt, model, created), headers)
    valid = await service.off_loop(lambda: _validate_chat(service, body, prompt))
    validation = time.monotonic() - start
    result = await until_disconnect(request, service.generate(valid))
    headers = tgi_headers.generate_headers(result, state.compute_type, validation)
    payload = openai_bodies.chat_completion(result, model, created, bool(body.logprobs), _tool_plan(body))
    return JSONResponse(payload, headers=headers)


async def chat_tokenize(request: Request) -> Response:
    """TGI's `/chat_tokenize`: the prompt `/v1/chat/completions` would run for this request, and its tokens
    (no special tokens added: the template has them)."""
    state = _state(request)
    body = await read_json(request, ChatRequest, state.limits.max_body_bytes)
    service = state.ready_service()

    def tokenize() -> ChatTokenizeResponse:
        prompt = _chat_prompt(service, body)
        tokens = service.simple_tokens(prompt, add_special_tokens=False)
        return {"tokenize_response": tokens, "templated_text": prompt}

    return JSONResponse(await service.off_loop(tokenize))


def _validate_completion(
    state: AppState, service: GenerationService, body: CompletionRequest
) -> list[ValidRequest]:
    params = body.parameters()
    return [
        service.validate(p, params, stream=body.stream, frequency_rule=FrequencyRule.OPENAI)
        for p in _prompts(state, body)
    ]


def _prompts(state: AppState, body: CompletionRequest) -> list[str]:
    """The prompts, with TGI's checks that answer before a stream starts: an empty list is a body error (as
    TGI's deserializer says), a suffix or too many prompts a 422 of TGI's own error types."""
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise BodyTypeError("prompt: Empty array detected. Do not use an empty array for the prompt.")
    if body.suffix is not None:
        raise SuffixError()
    most = state.limits.max_client_batch_size
    if len(prompts) > most:
        raise BatchSizeError(f"Number of prompts exceeds the maximum allowed batch size of {most}")
    return prompts


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
    body.select_adapter(_adapter(state, body.model))
    model, created = _model_name(state, body.model), int(time.time())
    prompts = _prompts(state, body)
    if body.stream:
        headers = tgi_headers.stream_headers(state.compute_type, sum(len(p) for p in prompts))
        return EventStream(_completion_events(state, service, body, model, created), headers)
    start = time.monotonic()
    valids = await service.off_loop(lambda: _validate_completion(state, service, body))
    validation = (time.monotonic() - start) / len(valids)
    work = asyncio.gather(*(service.generate(v) for v in valids))
    results = await until_disconnect(request, work)
    headers = tgi_headers.summed_headers(
        [tgi_headers.generate_headers(r, state.compute_type, validation) for r in results]
    )
    return JSONResponse(openai_bodies.completion(list(results), model, created), headers=headers)


async def models(request: Request) -> Response:
    model = _state(request).model
    return JSONResponse(openai_bodies.model_list(model.model_id, model.adapters))
