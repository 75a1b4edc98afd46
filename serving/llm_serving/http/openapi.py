"""The OpenAPI 3.1 document, generated from the wire types."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import TypeAdapter

from llm_contract import STATUS_PATH
from llm_serving.protocol import openai, tgi

REF = "#/components/schemas/{model}"

# With an API key, every route needs it but these: the kubelet's probe, Prometheus' scrape, the load status.
OPEN_PATHS = frozenset({"/health", "/metrics", STATUS_PATH})

# (method, path, summary, request type or None, response type or None)
ROUTES: list[tuple[str, str, str, Any, Any]] = [
    (
        "post",
        "/",
        "Generate (TGI compat; a list, or SSE with stream)",
        tgi.CompatGenerateRequest,
        list[tgi.GenerateResponse],
    ),
    ("get", "/", "Health", None, None),
    ("post", "/generate", "Generate tokens", tgi.GenerateRequest, tgi.GenerateResponse),
    ("post", "/generate_stream", "Generate a stream of tokens (SSE)", tgi.GenerateRequest, None),
    ("post", "/tokenize", "Tokenize inputs", tgi.GenerateRequest, list[tgi.SimpleToken]),
    (
        "post",
        "/chat_tokenize",
        "Template and tokenize a chat request",
        openai.ChatRequest,
        tgi.ChatTokenizeResponse,
    ),
    ("get", "/info", "Model and server info", None, tgi.Info),
    ("get", "/health", "Health: 200 once the model is loaded", None, None),
    ("get", "/ping", "Health", None, None),
    ("get", "/metrics", "Prometheus metrics", None, None),
    ("get", STATUS_PATH, "Loading phase and progress (answers while the model loads)", None, None),
    ("get", "/v1/models", "List models", None, openai.ModelList),
    (
        "post",
        "/v1/chat/completions",
        "OpenAI chat completions",
        openai.ChatRequest,
        openai.ChatCompletion,
    ),
    ("post", "/v1/completions", "OpenAI completions", openai.CompletionRequest, openai.Completion),
]


def _schema(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = TypeAdapter(tp).json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    return schema


@functools.cache
def openapi_document() -> dict[str, Any]:
    """Paths, request bodies, responses and the bearer scheme."""
    components: dict[str, Any] = {"ErrorResponse": _schema(tgi.ErrorResponse, {})}
    error = {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}
    paths: dict[str, Any] = {}
    for method, path, summary, request, response in ROUTES:
        op: dict[str, Any] = {"summary": summary, "responses": {}}
        ok: dict[str, Any] = {"description": "OK"}
        if response is not None:
            ok["content"] = {"application/json": {"schema": _schema(response, components)}}
        op["responses"]["200"] = ok
        if request is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _schema(request, components)}},
            }
            op["responses"]["422"] = {"description": "Input validation error", "content": error}
            op["responses"]["429"] = {"description": "Model is overloaded", "content": error}
            op["responses"]["424"] = {"description": "Generation error", "content": error}
        if path not in OPEN_PATHS:
            op["security"] = [{"bearer": []}]
            op["responses"]["401"] = {"description": "Missing or wrong bearer token", "content": error}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-serving",
            "description": "TGI- and OpenAI-compatible text generation",
            "version": "0.1.0",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
