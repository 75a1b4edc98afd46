"""The Starlette application: route table, bearer-token check, error mapping."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llm_serving.errors import ServingError
from llm_serving.http import openai, tgi
from llm_serving.http.io import ClientDisconnected, error_response
from llm_serving.http.openapi import openapi_document
from llm_serving.http.state import AppState

Handler = Callable[[Request], Awaitable[Response]]


def _authorized(state: AppState, request: Request) -> bool:
    if not state.api_key:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), state.api_key.encode())


def _endpoint(handler: Handler, *, protected: bool) -> Handler:
    async def endpoint(request: Request) -> Response:
        state: AppState = request.app.state.serving
        if protected and not _authorized(state, request):
            return Response(status_code=401)
        try:
            return await handler(request)
        except ServingError as exc:
            return error_response(exc)
        except ClientDisconnected:
            return Response(status_code=499)

    return endpoint


async def _openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and wrong methods answer with an empty body, as axum does."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return Response(status_code=status)


def build_app(state: AppState) -> Starlette:
    """The ASGI app for `state`; the model may still be loading (`/health` says 503 until then)."""
    gen = {"protected": True}
    open_ = {"protected": False}
    routes = [
        Route("/", _endpoint(tgi.compat_generate, **gen), methods=["POST"]),
        Route("/", _endpoint(tgi.health, **open_), methods=["GET"]),
        Route("/generate", _endpoint(tgi.generate, **gen), methods=["POST"]),
        Route("/generate_stream", _endpoint(tgi.generate_stream, **gen), methods=["POST"]),
        Route("/tokenize", _endpoint(tgi.tokenize, **gen), methods=["POST"]),
        Route("/info", _endpoint(tgi.info, **open_), methods=["GET"]),
        Route("/health", _endpoint(tgi.health, **open_), methods=["GET"]),
        Route("/ping", _endpoint(tgi.health, **open_), methods=["GET"]),
        Route("/metrics", _endpoint(tgi.metrics, **open_), methods=["GET"]),
        Route("/v1/models", _endpoint(openai.models, **open_), methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(openai.chat_completions, **gen), methods=["POST"]),
        Route("/v1/completions", _endpoint(openai.completions, **gen), methods=["POST"]),
        Route("/openapi.json", _openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.serving = state
    return app
