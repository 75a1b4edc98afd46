"""Serving fixtures: real servers on loopback ports, started as subprocesses or in a thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from transformers import PreTrainedModel

from llm_devstack import models as devstack_models
from llm_devstack.ports import free_port
from llm_serving.boot import build_service
from llm_serving.config import Limits
from llm_serving.distributed import DistContext
from llm_serving.http.app import build_app
from llm_serving.http.state import AppState, ModelInfo
from llm_serving.loading import load, resolve
from llm_serving.metrics import Metrics
from tests.serving import models

API_KEY = "test-key-123"
REPO = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 300.0


@dataclass
class Server:
    url: str
    api_key: str | None
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    health_seen: tuple[int, ...] = ()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-20000:] if self.log else ""


def _wait_healthy(server: Server) -> None:
    """Poll `/health` until 200, remembering every status seen; fail if the process dies."""
    seen: list[int] = []
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            status = httpx.get(f"{server.url}/health", timeout=5).status_code
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == 200:
                server.health_seen = tuple(seen)
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not healthy after {STARTUP_SECONDS}s:\n{server.log_tail()}")


def server_env(api_key: str | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("API_KEY", None)
    env.pop("GRACEFUL_SHUTDOWN_SECONDS", None)
    if api_key:
        env["API_KEY"] = api_key
    return env | extra


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server process still running, SIGKILL it after 60 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def subprocess_server(
    args: Sequence[str],
    log: Path,
    *,
    api_key: str | None = API_KEY,
    launcher: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    command: Sequence[str] | None = None,
) -> Iterator[Server]:
    """`python -m llm_serving ARGS` (or under `launcher`, e.g. torchrun, or `command` that takes the flags,
    e.g. the image's entry point) on a free loopback port; the key and `env` go in the environment."""
    port = free_port()
    cmd = [
        *(command or [*(launcher or [sys.executable]), "-m", "llm_serving"]),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    environ = server_env(api_key, **(env or {}))
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=environ, cwd=REPO)
    server = Server(url=f"http://127.0.0.1:{port}", api_key=api_key, process=process, log=log)
    try:
        _wait_healthy(server)
        yield server
    finally:
        stop(process)


@contextmanager
def thread_server(
    model_dir: Path,
    limits: Limits,
    *,
    api_key: str | None = API_KEY,
    model_class: type[PreTrainedModel] | None = None,
) -> Iterator[Server]:
    """The same app in this process, on uvicorn in a thread: for tests that need special limits, or a
    model of another class (`model_class.from_pretrained(model_dir)`, e.g. one that fails)."""
    source = resolve(str(model_dir))
    model, tokenizer = load(source, "float32")
    if model_class is not None:
        model = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    metrics = Metrics(source.model_id)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, group=None)
    state = AppState(limits=limits, metrics=metrics, model=ModelInfo(source.model_id), api_key=api_key)
    state.service = build_service(model, tokenizer, limits, metrics, ctx)
    state.progress.phase("Ready")
    port = free_port()
    config = uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    server = Server(url=f"http://127.0.0.1:{port}", api_key=api_key)
    try:
        _wait_healthy(server)
        yield server
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        state.service.close()


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return models.tiny_model_dir()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return devstack_models.smollm2_dir()


@pytest.fixture(scope="session")
def tiny_server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny model behind the real entry point, with a bearer token and small limits."""
    log = tmp_path_factory.mktemp("tiny") / "server.log"
    args = ["--model", str(tiny_dir), "--max-input-tokens", "256", "--max-total-tokens", "512"]
    with subprocess_server(args, log) as server:
        yield server


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """SmolLM2-135M-Instruct behind the real entry point."""
    log = tmp_path_factory.mktemp("smollm2") / "server.log"
    args = ["--model", str(smollm2_dir), "--max-input-tokens", "128", "--max-total-tokens", "640"]
    with subprocess_server(args, log) as server:
        yield server
