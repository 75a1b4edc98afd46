"""Tensor parallel under torchrun with gloo: 3 ranks (SmolLM2 has 9 heads, 3 KV heads) match one rank, and a
follower that fails or hangs in a step ends the request with TGI's error and every rank (no 365-day wait)."""

from __future__ import annotations

import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from tests.serving.conftest import REPO, Server, subprocess_server
from tests.serving.fault_injection import FAULT_KIND_ENV, FAULT_RANK_ENV, FAULT_TOKEN_ENV

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


@pytest.mark.parametrize("kind", ["raise", "hang"])
def test_a_failing_follower_ends_the_request_and_every_rank(
    tiny_dir: Path, tmp_path: Path, kind: str
) -> None:
    """Rank 1's forward raises (or hangs) on a trigger token (2 ranks over the tiny Llama's 4 heads, 2 KV
    heads): rank 0 answers that request with TGI's error instead of waiting in the step's collective (on a
    crashed rank at once, on a hung one after `--tp-step-timeout`, never the 365-day idle timeout), turns
    unhealthy and exits; torchrun then ends every rank and exits non-zero."""
    trigger = "The old map of Zanzibar"
    token = AutoTokenizer.from_pretrained(tiny_dir)(trigger)["input_ids"][-1]
    worker = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command = [*worker, str(REPO / "tests" / "serving" / "fault_injection.py")]
    env = {FAULT_RANK_ENV: "1", FAULT_TOKEN_ENV: str(token), FAULT_KIND_ENV: kind, "PYTHONPATH": str(REPO)}
    args = ["--model", str(tiny_dir), "--max-input-tokens", "128", "--max-total-tokens", "640"]
    args += ["--tp-step-timeout", "5"]
    with subprocess_server(args, tmp_path / "tp.log", command=command, env=env) as tp:
        assert tp.process is not None
        with tp.client(timeout=60) as client:
            served = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}})
            assert served.status_code == 200, served.text
            failed = client.post("/generate", json={"inputs": trigger, "parameters": {"max_new_tokens": 5}})
        assert failed.status_code == 503
        assert failed.json()["error_type"] == "healthcheck"
        assert failed.json()["error"].startswith("Request failed during generation: the engine stopped: ")
        assert tp.process.wait(timeout=90) != 0
    log = tp.log_tail()
    assert "engine failed: " in log
    if kind == "raise":
        assert "rank 1: step failed; exiting" in log
        assert "injected fault" in log
