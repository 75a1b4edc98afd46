"""TGI routes: parse, call the service, build the body. Errors become responses in one place."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from llm_serving import tgi_bodies, tgi_headers
from llm_serving.errors import HealthCheckError, ServingError
from llm_serving.http.io import EventStream, read_json, sse_data, until_disconnect
from llm_serving.http.state import AppState
from llm_serving.protocol.tgi import CompatGenerateRequest, GenerateRequest, Info
from llm_serving.service import GenerationService

VERSION = "3.3.6-llm-serving"


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.serving
    return state


def _full_text(state: AppState, body: GenerateRequest, *, compat: bool) -> bool:
    """TGI: `return_full_text` defaults to true on `/` for text-generation models, false elsewhere."""
    if body.parameters.return_full_text is not None:
        return body.parameters.return_full_text
    return compat and state.model.pipeline_tag in (None, "text-generation")


async def _generate(request: Request, body: GenerateRequest, *, compat: bool) -> Response:
    state = _state(request)
    service = state.ready_service()
    start = time.monotonic()
    valid = await service.off_loop(lambda: service.validate(body.inputs, body.parameters, stream=False))
    validation = time.monotonic() - start
    result = await until_disconnect(request, service.generate(valid))
    payload = tgi_bodies.generate_response(
        result, service.tokenizer.decode, _full_text(state, body, compat=compat)
    )
    headers = tgi_headers.generate_headers(result, state.compute_type, validation)
    return JSONResponse([payload] if compat else payload, headers=headers)


async def _token_events(
    state: AppState, service: GenerationService, body: GenerateRequest, *, compat: bool
) -> AsyncGenerator[str, None]:
    """The SSE body: validation and overload errors arrive as events, after a 200."""
    try:
        valid = await service.off_loop(lambda: service.validate(body.inputs, body.parameters, stream=True))
        full = _full_text(state, body, compat=compat)
        async with aclosing(service.stream(valid)) as items:
            index = 0
            async for item in items:
                index += 1
                yield sse_data(tgi_bodies.stream_response(valid, item, index, full))
    except ServingError as exc:
        yield sse_data(exc.body())


def _stream(request: Request, body: GenerateRequest, *, compat: bool) -> Response:
    state = _state(request)
    headers = tgi_headers.stream_headers(state.compute_type, len(body.inputs))
    return EventStream(_token_events(state, state.ready_service(), body, compat=compat), headers)


async def generate(request: Request) -> Response:
    body = await read_json(request, GenerateRequest, _state(request).limits.max_body_bytes)
    return await _generate(request, body, compat=False)


async def generate_stream(request: Request) -> Response:
    body = await read_json(request, GenerateRequest, _state(request).limits.max_body_bytes)
    return _stream(request, body, compat=False)


async def compat_generate(request: Request) -> Response:
    """`POST /`: a list for plain answers, the `/generate_stream` SSE with `stream: true`."""
    body = await read_json(request, CompatGenerateRequest, _state(request).limits.max_body_bytes)
    if body.stream:
        return _stream(request, body, compat=True)
    return await _generate(request, body, compat=True)


async def tokenize(request: Request) -> Response:
    state = _state(request)
    body = await read_json(request, GenerateRequest, state.limits.max_body_bytes)
    service = state.ready_service()
    return await service.off_loop(lambda: JSONResponse(service.simple_tokens(body.inputs)))


async def info(request: Request) -> Response:
    state = _state(request)
    limits = state.limits if state.service is None else state.service.limits
    body: Info = {
        "model_id": state.model.model_id,
        "model_sha": state.model.model_sha,
        "model_pipeline_tag": state.model.pipeline_tag,
        "max_concurrent_requests": limits.max_concurrent_requests,
        "max_best_of": limits.max_best_of,
        "max_stop_sequences": limits.max_stop_sequences,
        "max_input_tokens": limits.max_input_tokens,
        "max_total_tokens": limits.max_total_tokens,
        "max_batch_total_tokens": limits.max_batch_total_tokens,
        "validation_workers": limits.validation_workers,
        "max_client_batch_size": limits.max_client_batch_size,
        "router": "llm-serving",
        "version": VERSION,
        "sha": None,
        "docker_label": None,
    }
    return JSONResponse(body)


async def health(request: Request) -> Response:
    """200 with an empty body once the model is loaded, while the engine runs and the server is not draining;
    503 otherwise (for good once the engine has failed, so that the kubelet restarts the pod)."""
    state = _state(request)
    if state.service is None or state.draining or state.service.failure is not None:
        raise HealthCheckError()
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    """The text exposition as TGI sends it: `text/plain; charset=utf-8`, no format version (read as 0.0.4)."""
    return PlainTextResponse(_state(request).metrics.exposition())
