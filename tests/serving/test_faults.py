"""Faults: a step failing for real (a model whose forward raises), a broken engine loop, SIGTERM's drain."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from llm_serving.config import Limits
from llm_serving.engine.engine import Engine
from llm_serving.outputs import Event, StepStats
from tests.serving.conftest import REPO, Server, subprocess_server, thread_server
from tests.serving.fault_injection import trigger_llama
from tests.serving.models import OutOfMemoryOnceLlama

LIMITS = Limits(max_input_tokens=256, max_total_tokens=2048)
STREAM = {"inputs": "Once upon a time,", "parameters": {"max_new_tokens": 50, "details": True}}
TRIGGER = "The old map of Zanzibar"
DEAD = "Request failed during generation: the engine stopped: "


def events(lines: Iterator[str]) -> list[dict[str, object]]:
    return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]


def wait_for_health(server: Server, status: int) -> None:
    for _ in range(600):
        if httpx.get(f"{server.url}/health", timeout=10).status_code == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"/health never answered {status}")


def trigger_token(tiny_dir: Path) -> int:
    """The last token of `TRIGGER`, which no other prompt here holds."""
    return int(AutoTokenizer.from_pretrained(tiny_dir)(TRIGGER)["input_ids"][-1])


def test_a_failing_step_fails_its_request_and_serving_goes_on(tiny_dir: Path) -> None:
    """The model's forward raises on a trigger token: that request gets TGI's 424 (the stream its error
    event), `/health` stays 200 and the next request is served."""
    model_class = trigger_llama(trigger_token(tiny_dir))
    with (
        thread_server(tiny_dir, LIMITS, model_class=model_class) as server,
        server.client(timeout=60) as client,
    ):
        failed = client.post("/generate", json={"inputs": TRIGGER, "parameters": {"max_new_tokens": 5}})
        assert failed.status_code == 424
        body = failed.json()
        assert body["error_type"] == "generation"
        assert body["error"].startswith("Request failed during generation: RuntimeError: injected fault")
        stream = {"inputs": TRIGGER, "parameters": {"max_new_tokens": 5}}
        with client.stream("POST", "/generate_stream", json=stream) as response:
            received = events(response.iter_lines())
        assert received == [body]
        assert client.get("/health").status_code == 200
        served = client.post("/generate", json=STREAM)
        assert served.status_code == 200
        assert served.json()["details"]["generated_tokens"] == 50


def test_a_broken_engine_loop_ends_every_request_and_turns_health_503(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Engine.step` raising past its own handling (a bug; under tensor parallelism any failure): both open
    streams end with TGI's error event, `/health` is 503 from then on and later requests are refused with
    503 (the kubelet restarts the pod; the gateway retries elsewhere)."""
    broken = threading.Event()
    step = Engine.step

    def breaking_step(engine: Engine) -> tuple[list[Event], StepStats | None]:
        if broken.is_set():
            raise RuntimeError("injected loop fault")
        return step(engine)

    monkeypatch.setattr(Engine, "step", breaking_step)
    long = {"inputs": "Once upon a time,", "parameters": {"max_new_tokens": 2000}}
    with thread_server(tiny_dir, LIMITS) as server, ExitStack() as stack:
        streams = []
        for _ in range(2):
            client = stack.enter_context(server.client(timeout=60))
            response = stack.enter_context(client.stream("POST", "/generate_stream", json=long))
            streams.append(response.iter_lines())
        first = [events(itertools.islice(lines, 1)) for lines in streams]
        broken.set()
        for received in (head + events(lines) for head, lines in zip(first, streams, strict=True)):
            assert "token" in received[0]
            assert received[-1] == {
                "error": f"{DEAD}RuntimeError: injected loop fault",
                "error_type": "healthcheck",
            }
            assert len(received) < 2000
        with server.client(timeout=60) as client:
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json() == {"error": "unhealthy", "error_type": "healthcheck"}
            refused = client.post("/generate", json=STREAM)
            assert refused.status_code == 503
            assert refused.json()["error_type"] == "healthcheck"


def test_out_of_memory_fails_the_batch_and_serving_goes_on(tiny_dir: Path) -> None:
    with (
        thread_server(tiny_dir, LIMITS, model_class=OutOfMemoryOnceLlama) as server,
        server.client() as client,
    ):
        failed = client.post("/generate", json=STREAM)
        assert failed.status_code == 424
        assert failed.json()["error_type"] == "generation"
        assert "OutOfMemoryError" in failed.json()["error"]
        assert client.get("/health").status_code == 200
        assert client.post("/generate", json=STREAM).status_code == 200


def _drain_server(tiny_dir: Path, log: Path, seconds: int) -> AbstractContextManager[Server]:
    args = ["--model", str(tiny_dir), "--max-total-tokens", "2048"]
    return subprocess_server(args, log, env={"GRACEFUL_SHUTDOWN_SECONDS": str(seconds)})


def test_sigterm_lets_open_streams_finish_and_refuses_new_requests(tiny_dir: Path, tmp_path: Path) -> None:
    with _drain_server(tiny_dir, tmp_path / "log", 120) as server:
        assert server.process is not None
        body = {"inputs": "Once upon a time,", "parameters": {"max_new_tokens": 300, "details": True}}
        with server.client() as client, client.stream("POST", "/generate_stream", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.process.send_signal(signal.SIGTERM)
            wait_for_health(server, 503)
            with server.client() as other:
                refused = other.post("/generate", json={"inputs": "hi"})
            assert refused.status_code == 503
            assert refused.json() == {"error": "Server is shutting down", "error_type": "healthcheck"}
            assert refused.headers["connection"] == "close"
            received = events(lines)
        assert received[-1]["details"]["generated_tokens"] == 300  # type: ignore[index]
        assert server.process.wait(timeout=60) == 0


def test_sigterm_ends_streams_that_outlast_the_drain(tiny_dir: Path, tmp_path: Path) -> None:
    with _drain_server(tiny_dir, tmp_path / "log", 1) as server:
        assert server.process is not None
        body = {"inputs": "Once upon a time,", "parameters": {"max_new_tokens": 2000}}
        with server.client() as client, client.stream("POST", "/generate_stream", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.process.send_signal(signal.SIGTERM)
            received = events(lines)
        error = received[-1]
        assert error["error_type"] == "incomplete_generation"
        assert str(error["error"]).startswith("Server is shutting down: the 1 s drain ended")
        assert all("token" in e for e in received[:-1])
        assert len(received) < 2000
        assert server.process.wait(timeout=60) == 0


def test_entrypoint_gives_torchrun_the_drain_budget(tiny_dir: Path, tmp_path: Path) -> None:
    """Through the image's entry point (torchrun): SIGTERM reaches rank 0, which ends a stream that outlasts
    GRACEFUL_SHUTDOWN_SECONDS with TGI's error event, and the rank exits by itself (torchrun's own
    30 s limit would otherwise kill a longer drain, and the old server drained 60 s whatever the budget)."""
    entrypoint = ["sh", str(REPO / "serving" / "docker-entrypoint.sh")]
    env = {"GRACEFUL_SHUTDOWN_SECONDS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    args = ["--model", str(tiny_dir), "--max-total-tokens", "2048"]
    with subprocess_server(args, tmp_path / "log", command=entrypoint, env=env) as server:
        assert server.process is not None
        body = {"inputs": "Once upon a time,", "parameters": {"max_new_tokens": 2000}}
        with server.client() as client, client.stream("POST", "/generate_stream", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.process.send_signal(signal.SIGTERM)
            received = events(lines)
        assert received[-1]["error_type"] == "incomplete_generation"
        server.process.wait(timeout=60)  # torchrun itself exits 1 after a signal, whatever its ranks did
        log = server.log_tail()
        assert "Finished server process" in log
        assert "SIGKILL" not in log
