"""The `API_KEY` bearer token: required on every route but `/health`, `/metrics` and `/status`; no key, no
check."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from llm_contract import STATUS_PATH
from llm_serving.config import Limits
from llm_serving.http.app import authorized
from tests.serving.conftest import Server, thread_server

GET_ROUTES = ("/", "/info", "/ping", "/v1/models", "/openapi.json")
POST_ROUTES = {
    "/": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/generate": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/generate_stream": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/tokenize": {"inputs": "hi"},
    "/chat_tokenize": {"messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
}


def _call(server: Server, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    body = POST_ROUTES.get(path) if method == "POST" else None
    return httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=120)


@pytest.mark.parametrize(
    ("method", "path"), [("GET", p) for p in GET_ROUTES] + [("POST", p) for p in POST_ROUTES]
)
def test_every_route_needs_the_key(tiny_server: Server, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Token {tiny_server.api_key}"}):
        response = _call(tiny_server, method, path, headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.json() == {"error": "Missing or invalid bearer token", "error_type": "unauthorized"}
        assert response.headers["www-authenticate"] == "Bearer"
    assert _call(tiny_server, method, path, tiny_server.headers).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/metrics", STATUS_PATH])
def test_probe_and_scrape_routes_are_open(tiny_server: Server, path: str) -> None:
    assert httpx.get(f"{tiny_server.url}{path}").status_code == 200


def test_without_a_key_every_route_is_open(tiny_dir: Path) -> None:
    limits = Limits(max_input_tokens=256, max_total_tokens=512)
    with thread_server(tiny_dir, limits, api_key=None) as server:
        assert server.headers == {}
        for path in GET_ROUTES:
            assert _call(server, "GET", path, {}).status_code == 200, path
        for path in POST_ROUTES:
            assert _call(server, "POST", path, {"Authorization": "Bearer anything"}).status_code == 200, path


def test_key_comparison() -> None:
    assert authorized(None, "")
    assert authorized("k", "Bearer k")
    assert authorized("k", "bearer  k ")
    assert not authorized("k", "Bearer k2")
    assert not authorized("k", "k")
    assert not authorized("k", "")
