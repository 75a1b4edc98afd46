"""Tensor parallel under torchrun with gloo: 3 ranks (SmolLM2 has 9 heads, 3 KV heads) match one rank."""

from __future__ import annotations

import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.serving.conftest import Server, subprocess_server

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]


def greedy_tokens(server: Server, prompt: str) -> list[int]:
    body: dict[str, Any] = {"inputs": prompt, "parameters": {"max_new_tokens": 10, "details": True}}
    with server.client() as client:
        response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_three_ranks_equal_one_rank(smollm2_dir: Path, smollm2_server: Server, tmp_path: Path) -> None:
    single = [greedy_tokens(smollm2_server, p) for p in PROMPTS]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3"]
    args = ["--model", str(smollm2_dir), "--max-input-tokens", "128", "--max-total-tokens", "640"]
    with subprocess_server(args, tmp_path / "tp.log", launcher=torchrun) as tp:
        with ThreadPoolExecutor(max_workers=3) as pool:  # batched on the TP group too
            sharded = list(pool.map(lambda p: greedy_tokens(tp, p), PROMPTS))
        # Every rank took part in those steps; each logs once its shard is loaded.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ranks = set(re.findall(r"rank (\d)/3: model loaded, tensor parallel 3", tp.log_tail()))
            if ranks == {"0", "1", "2"}:
                break
            time.sleep(0.5)
        assert ranks == {"0", "1", "2"}, tp.log_tail()
    assert sharded == single
