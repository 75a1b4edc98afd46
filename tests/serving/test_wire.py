"""Wire-exact TGI: the response headers as TGI 3.3's router sends them (read off the raw socket for the
streams), and `/chat_tokenize`."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from transformers import AutoTokenizer

from tests.serving.conftest import Server

MESSAGES = [{"role": "user", "content": "Héllo, say hi"}]
STREAMS: dict[str, dict[str, Any]] = {
    "/generate_stream": {"inputs": "Héllo there", "parameters": {"max_new_tokens": 2}},
    "/": {"inputs": "Héllo there", "parameters": {"max_new_tokens": 2}, "stream": True},
    "/v1/completions": {"prompt": ["Héllo there", "ab"], "max_tokens": 2, "stream": True},
    "/v1/chat/completions": {"messages": MESSAGES, "max_tokens": 2, "stream": True},
}
TIMES = ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time", "x-time-per-token")


def _raw_head(server: Server, path: str, body: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """POST `body` over a plain socket: the status line and the header lines exactly as sent."""
    url = urlsplit(server.url)
    data = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {server.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data
    with socket.create_connection((url.hostname, url.port), timeout=120) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    status, *lines = received.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return status, [(name, value) for name, _, value in (line.partition(": ") for line in lines)]


def _templated(tiny_dir: Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    return str(tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True))


@pytest.mark.parametrize("path", list(STREAMS))
def test_streams_send_tgis_headers_exactly(tiny_server: Server, tiny_dir: Path, path: str) -> None:
    status, headers = _raw_head(tiny_server, path, STREAMS[path])
    assert status == "HTTP/1.1 200 OK"
    # exactly `text/event-stream`, no charset: the 2.x @huggingface/inference compares the whole value
    assert ("content-type", "text/event-stream") in headers
    named = dict(headers)
    assert len(named) == len(headers)  # no header twice
    body = STREAMS[path]
    prompts = body.get("inputs") or body.get("prompt") or [_templated(tiny_dir)]
    characters = sum(len(p) for p in ([prompts] if isinstance(prompts, str) else prompts))
    # as hyper: a date, no server header; `connection: close` answers the request's
    assert named.keys() - {"date", "connection"} == {
        "content-type",
        "cache-control",
        "x-accel-buffering",
        "x-compute-type",
        "x-compute-characters",
        "transfer-encoding",
        "vary",
        "access-control-allow-origin",
    }
    assert (named["cache-control"], named["x-accel-buffering"]) == ("no-cache", "no")
    assert (named["x-compute-type"], named["x-compute-characters"]) == ("cpu+optimized", str(characters))
    assert named["transfer-encoding"] == "chunked"


def test_generate_sends_the_compute_and_timing_headers(tiny_server: Server) -> None:
    inputs = "Héllo there"
    with tiny_server.client() as client:
        response = client.post("/generate", json={"inputs": inputs, "parameters": {"max_new_tokens": 3}})
        prompt = client.post("/tokenize", json={"inputs": inputs}).json()
    h = response.headers
    assert h["content-type"] == "application/json"
    assert (h["x-compute-type"], h["x-compute-characters"]) == ("cpu+optimized", str(len(inputs)))
    assert (h["x-prompt-tokens"], h["x-generated-tokens"]) == (str(len(prompt)), "3")
    assert all(h[name].isdigit() for name in TIMES)
    # seconds as Rust writes an f64 (no exponent), matching the milliseconds of x-total-time
    assert abs(float(h["x-compute-time"]) * 1000 - int(h["x-total-time"])) <= 1
    assert "e" not in h["x-compute-time"]
    assert int(h["x-total-time"]) >= int(h["x-inference-time"]) >= int(h["x-time-per-token"])


def test_openai_answers_carry_tgis_headers(tiny_server: Server, tiny_dir: Path) -> None:
    prompts = ["Héllo there", "ab"]
    with tiny_server.client() as client:
        completion = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 2})
        chat = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    usage, h = completion.json()["usage"], completion.headers
    # summed over the prompts, and no x-compute-time (as TGI)
    assert "x-compute-time" not in h
    assert h["x-compute-characters"] == str(sum(len(p) for p in prompts))
    assert (h["x-prompt-tokens"], h["x-generated-tokens"]) == (
        str(usage["prompt_tokens"]),
        str(usage["completion_tokens"]),
    )
    usage, h = chat.json()["usage"], chat.headers
    assert h["x-compute-characters"] == str(len(_templated(tiny_dir)))
    assert (h["x-prompt-tokens"], h["x-generated-tokens"]) == (
        str(usage["prompt_tokens"]),
        str(usage["completion_tokens"]),
    )
    assert all(h[name].isdigit() for name in TIMES)
    assert float(h["x-compute-time"]) > 0


def test_chat_tokenize_answers_the_templated_prompt_and_its_tokens(
    tiny_server: Server, tiny_dir: Path
) -> None:
    body = {"messages": MESSAGES, "max_tokens": 4}
    with tiny_server.client() as client:
        answer = client.post("/chat_tokenize", json=body)
        chat = client.post("/v1/chat/completions", json=body).json()
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    result = answer.json()
    assert result.keys() == {"tokenize_response", "templated_text"}
    templated = _templated(tiny_dir)
    assert result["templated_text"] == templated
    tokens = result["tokenize_response"]
    expected = AutoTokenizer.from_pretrained(tiny_dir)(templated, add_special_tokens=False)["input_ids"]
    assert [t["id"] for t in tokens] == expected
    assert len(tokens) == chat["usage"]["prompt_tokens"]  # what the chat route runs
    raw = templated.encode()
    for token in tokens:
        assert token.keys() == {"id", "text", "start", "stop"}
        assert raw[token["start"] : token["stop"]].decode() == token["text"]  # byte offsets, as TGI's


def test_chat_tokenize_refuses_what_the_chat_route_refuses(tiny_server: Server) -> None:
    assert httpx.post(f"{tiny_server.url}/chat_tokenize", json={"messages": MESSAGES}).status_code == 401
    with tiny_server.client() as client:
        empty = client.post("/chat_tokenize", json={"messages": []})
        long = client.post("/chat_tokenize", json={"messages": [{"role": "user", "content": "hi " * 400}]})
    assert empty.status_code == 422
    assert empty.headers["content-type"].startswith("text/plain")
    assert long.status_code == 422
    assert long.json()["error_type"] == "validation"


def test_cors_is_tgis_default(tiny_server: Server) -> None:
    """tower-http's `CorsLayer` as TGI sets it: any origin on every answer; OPTIONS is a preflight, answered
    without the key; `authorization` is not an allowed header, so protected routes stay same-origin."""
    vary = "origin, access-control-request-method, access-control-request-headers"
    for response in (
        httpx.get(f"{tiny_server.url}/health"),
        httpx.get(f"{tiny_server.url}/info"),  # a 401: no key
        httpx.get(f"{tiny_server.url}/nowhere"),
    ):
        assert response.headers["access-control-allow-origin"] == "*"
        assert response.headers["vary"] == vary
    preflight = httpx.options(
        f"{tiny_server.url}/generate",
        headers={"origin": "https://app.example", "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.content == b""
    assert preflight.headers["access-control-allow-methods"] == "GET,POST"
    assert preflight.headers["access-control-allow-headers"] == "content-type"
    assert preflight.headers["access-control-allow-origin"] == "*"


def test_a_wrong_method_is_405_with_allow(tiny_server: Server) -> None:
    response = httpx.put(f"{tiny_server.url}/generate", headers=tiny_server.headers)
    assert response.status_code == 405
    assert response.content == b""
    assert response.headers["allow"] == "POST"


def test_metrics_are_plain_text_as_tgi_sends_them(tiny_server: Server) -> None:
    response = httpx.get(f"{tiny_server.url}/metrics")
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert "tgi_request_count" in response.text
