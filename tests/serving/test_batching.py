"""Continuous batching: a request's tokens do not depend on its neighbours; cancellation; admission limits."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from llm_serving.config import Limits
from tests.serving.conftest import Server, thread_server

PROMPTS = [
    "Once upon a time,",
    "The quick brown fox",
    "In a galaxy far, far away there lived a",
    "Hello",
    "Numbers: one, two, three,",
    "Dear diary, today I",
]


def _request(i: int) -> dict[str, Any]:
    parameters: dict[str, Any] = {"max_new_tokens": 6 + 5 * (i % 4), "details": True}
    if i % 2:
        parameters.update(do_sample=True, seed=100 + i, temperature=1.5, top_k=50, top_p=0.95)
    return {"inputs": PROMPTS[i % len(PROMPTS)], "parameters": parameters}


def _tokens(server: Server, body: dict[str, Any]) -> list[int]:
    with server.client() as client:
        response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _same_alone_and_batched(server: Server, n: int) -> None:
    bodies = [_request(i) for i in range(n)]
    alone = [_tokens(server, b) for b in bodies]
    steps_before = metric(server, "tgi_batch_next_size_count")
    with ThreadPoolExecutor(max_workers=n) as pool:
        batched = list(pool.map(lambda b: _tokens(server, b), bodies))
    assert batched == alone
    # The concurrent requests really shared steps: fewer steps than tokens generated.
    steps = metric(server, "tgi_batch_next_size_count") - steps_before
    assert steps < sum(len(t) for t in alone)


def test_greedy_and_seeded_outputs_equal_alone_and_in_a_busy_batch(tiny_server: Server) -> None:
    _same_alone_and_batched(tiny_server, 12)


def test_real_model_batch_equals_single(smollm2_server: Server) -> None:
    _same_alone_and_batched(smollm2_server, 4)


def test_disconnect_cancels_the_request(tiny_server: Server) -> None:
    body = {"inputs": "Once upon a time,", "parameters": {"max_new_tokens": 400}}
    dropped = (
        metric(tiny_server, 'tgi_request_failure{err="dropped"}')
        if "dropped" in httpx.get(f"{tiny_server.url}/metrics").text
        else 0.0
    )
    with tiny_server.client() as client, client.stream("POST", "/generate_stream", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if metric(tiny_server, "llm_serving_requests_in_flight") == 0:
            break
        time.sleep(0.1)
    assert metric(tiny_server, "llm_serving_requests_in_flight") == 0
    assert metric(tiny_server, 'tgi_request_failure{err="dropped"}') == dropped + 1
    assert _tokens(tiny_server, _request(0))  # still serving


def test_admission_limit_answers_429(tiny_dir: Path) -> None:
    limits = Limits(max_input_tokens=64, max_total_tokens=4000, max_concurrent_requests=2)
    with thread_server(tiny_dir, limits) as server, server.client() as client:
        long = {"inputs": "Once upon a time,", "parameters": {"max_new_tokens": 3900}}
        with (
            client.stream("POST", "/generate_stream", json=long) as a,
            client.stream("POST", "/generate_stream", json=long) as b,
        ):
            # Keep the line iterators: dropping one closes its response (a disconnect).
            lines_a, lines_b = a.iter_lines(), b.iter_lines()
            assert next(lines_a).startswith("data: ")
            assert next(lines_b).startswith("data: ")
            refused = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
            assert refused.status_code == 429
            assert refused.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
            with client.stream("POST", "/generate_stream", json={"inputs": "hi"}) as c:
                assert c.status_code == 200
                event = json.loads(c.read().decode().strip()[len("data: ") :])
                assert event == {"error": "Model is overloaded", "error_type": "overloaded"}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
            if ok.status_code == 200:
                break
            time.sleep(0.2)
        assert ok.status_code == 200
