"""`/tokenize` on large inputs (linear, refused past `max_input_tokens`), and the event loop stays free while
large prompts are tokenized: `/health` answers during the work, not after it."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from llm_serving.config import Limits
from tests.serving.conftest import Server, thread_server

CJK = "这是一个用于检查分词器偏移量的测试句子东京和北京。"
BIG_LIMITS = Limits(max_input_tokens=200_000, max_total_tokens=200_001, max_batch_total_tokens=200_001)


def expected_tokens(tokenizer: object, text: str) -> list[dict[str, object]]:
    """The tokenizer's own character offsets as byte offsets, computed independently of the server."""
    encoding = tokenizer(text, return_offsets_mapping=True)  # type: ignore[operator]
    byte_at = [0, *itertools.accumulate(len(c.encode()) for c in text)]
    return [
        {"id": i, "text": text[start:stop], "start": byte_at[start], "stop": byte_at[stop]}
        for i, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    ]


def test_tokenize_offsets_are_byte_offsets(tiny_server: Server, tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = "naïve café — 東京 😀 wörld"
    with tiny_server.client() as client:
        tokens = client.post("/tokenize", json={"inputs": text}).json()
    assert tokens == expected_tokens(tokenizer, text)
    raw = text.encode()
    assert all(raw[t["start"] : t["stop"]].decode() == t["text"] for t in tokens)


def test_large_cjk_tokenize(tiny_dir: Path) -> None:
    """80k CJK characters (the input that took 22 s) come back whole and right."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = CJK * (80_000 // len(CJK))
    with thread_server(tiny_dir, BIG_LIMITS) as server, server.client() as client:
        response = client.post("/tokenize", json={"inputs": text})
    assert response.status_code == 200
    assert response.json() == expected_tokens(tokenizer, text)


def test_tokenize_over_max_input_tokens_is_refused(tiny_server: Server, tiny_dir: Path) -> None:
    n = len(AutoTokenizer.from_pretrained(tiny_dir)(CJK * 20)["input_ids"])
    assert n > 256
    with tiny_server.client() as client:
        response = client.post("/tokenize", json={"inputs": CJK * 20})
    assert response.status_code == 422
    message = f"Input validation error: `inputs` must have less than 256 tokens. Given: {n}"
    assert response.json() == {"error": message, "error_type": "validation"}


BIG_PROMPT: dict[str, Callable[[str], dict[str, Any]]] = {
    "/generate": lambda text: {"inputs": text, "parameters": {"max_new_tokens": 5}},
    "/tokenize": lambda text: {"inputs": text},
    "/v1/completions": lambda text: {"prompt": text, "max_tokens": 5},
    "/v1/chat/completions": lambda text: {"messages": [{"role": "user", "content": text}]},
}


@pytest.mark.parametrize("path", list(BIG_PROMPT))
def test_health_answers_while_a_big_prompt_is_tokenized(tiny_server: Server, path: str) -> None:
    """A 1.8 MB prompt (refused: too many tokens) takes a while to tokenize. `/health`, polled meanwhile,
    keeps answering in the second half of that time; with the loop blocked its answers would all wait
    until the big answer was sent."""
    body = json.dumps(BIG_PROMPT[path](CJK * (600_000 // len(CJK))), ensure_ascii=False).encode()
    assert 1_700_000 < len(body) < 2_000_000
    times: dict[str, float] = {}
    answer: list[httpx.Response] = []

    def big() -> None:
        with tiny_server.client() as client:
            times["start"] = time.monotonic()
            answer.append(client.post(path, content=body, headers={"content-type": "application/json"}))
            times["end"] = time.monotonic()

    sender = threading.Thread(target=big)
    sender.start()
    health: list[float] = []
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:
        for _ in range(100_000):
            if not sender.is_alive():
                break
            assert client.get("/health").status_code == 200
            health.append(time.monotonic())
    sender.join(timeout=120)
    assert answer[0].status_code == 422, answer[0].text
    assert "must have less than 256 tokens" in answer[0].text
    middle = (times["start"] + times["end"]) / 2
    assert any(middle < t < times["end"] for t in health), (times, health[-5:])
