"""The Starlette application: route table, bearer-token check, error mapping."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llm_contract import STATUS_PATH, bearer
from llm_serving.errors import ServingError, UnauthorizedError
from llm_serving.http import openai, status, tgi
from llm_serving.http.cors import TgiCors
from llm_serving.http.io import ClientDisconnected, error_response
from llm_serving.http.openapi import OPEN_PATHS, openapi_document
from llm_serving.http.state import AppState

Handler = Callable[[Request], Awaitable[Response]]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def authorized(api_key: str | None, authorization: str) -> bool:
    """Whether an `Authorization` header carries the key (always, without a key); constant-time."""
    if not api_key:
        return True
    token = bearer(authorization)
    return token is not None and hmac.compare_digest(_digest(token), _digest(api_key))


def _endpoint(handler: Handler, *, protected: bool) -> Handler:
    async def endpoint(request: Request) -> Response:
        state: AppState = request.app.state.serving
        try:
            if protected and not authorized(state.api_key, request.headers.get("authorization", "")):
                raise UnauthorizedError()
            return await handler(request)
        except ServingError as exc:
            return error_response(exc)
        except ClientDisconnected:
            return Response(status_code=499)

    return endpoint


async def _openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and wrong methods answer with an empty body, as axum does (405 with its `allow`)."""
    if isinstance(exc, HTTPException):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return Response(status_code=500)


def build_app(state: AppState) -> Starlette:
    """The ASGI app for `state`; the model may still be loading (`/health` says 503 until then, `/status`
    says how far it is)."""
    table: list[tuple[str, str, Handler]] = [
        ("POST", "/", tgi.compat_generate),
        ("GET", "/", tgi.health),
        ("POST", "/generate", tgi.generate),
        ("POST", "/generate_stream", tgi.generate_stream),
        ("POST", "/tokenize", tgi.tokenize),
        ("POST", "/chat_tokenize", openai.chat_tokenize),
        ("GET", "/info", tgi.info),
        ("GET", "/health", tgi.health),
        ("GET", "/ping", tgi.health),
        ("GET", "/metrics", tgi.metrics),
        ("GET", STATUS_PATH, status.status),
        ("GET", "/v1/models", openai.models),
        ("POST", "/v1/chat/completions", openai.chat_completions),
        ("POST", "/v1/completions", openai.completions),
        ("GET", "/openapi.json", _openapi),
    ]
    routes = [
        Route(path, _endpoint(handler, protected=path not in OPEN_PATHS), methods=[method])
        for method, path, handler in table
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error},
        middleware=[Middleware(TgiCors)],
    )
    app.state.serving = state
    return app
