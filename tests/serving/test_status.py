"""`/status` from the process's first second: the loading phases in order while a slowed download runs, the
port bound before torch is imported, and load failures that end the process with the failure line last on
stderr (what the operator reads from the container's termination message)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from llm_contract import LOAD_PHASES, STATUS_PATH, LoadStatus, failure_line, parse_failure
from llm_devstack.hub import StandInHub
from llm_devstack.ports import free_port
from tests.serving.conftest import API_KEY, REPO, STARTUP_SECONDS, server_env, stop

THROTTLE = 6_000_000
"""Bytes per second the stand-in Hub sends: the tiny model's ~29 MB take seconds, long enough to watch."""


@contextmanager
def _launch(
    args: Sequence[str], log: Path, env: dict[str, str], *, command: Sequence[str] = ("-m", "llm_serving")
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The server on a free loopback port (stdout and stderr to `log`); stopped afterwards."""
    port = free_port()
    cmd = [sys.executable, *command, "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def _watch(process: subprocess.Popen[bytes], url: str, log: Path) -> list[tuple[LoadStatus, int]]:
    """Poll `/health`, then `/status` (without the key), until healthy: every (status, health code) seen."""
    seen: list[tuple[LoadStatus, int]] = []
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-5000:]
        try:
            health = httpx.get(url + "/health", timeout=5).status_code
            status = LoadStatus.from_json(httpx.get(url + STATUS_PATH, timeout=5).json())
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        seen.append((status, health))
        if health == 200:
            return seen
        time.sleep(0.05)
    raise TimeoutError(log.read_text(errors="replace")[-5000:])


def _phases(seen: list[tuple[LoadStatus, int]]) -> list[str]:
    phases: list[str] = []
    for status, _ in seen:
        if not phases or phases[-1] != status.phase:
            phases.append(status.phase)
    return phases


def test_status_walks_the_phases_in_order_during_a_slowed_download(tiny_dir: Path, tmp_path: Path) -> None:
    with StandInHub() as hub:
        commit = hub.add_repo("org/tiny", tiny_dir)
        hub.throttle = THROTTLE
        env = server_env(API_KEY, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
        log = tmp_path / "server.log"
        with _launch(["--model", "org/tiny"], log, env) as (process, url):
            seen = _watch(process, url, log)
    phases = _phases(seen)
    assert [LOAD_PHASES.index(p) for p in phases] == sorted(LOAD_PHASES.index(p) for p in phases), phases
    assert {"Downloading", "Ready"} <= set(phases), phases
    assert "Failed" not in phases
    downloading = [s for s, _ in seen if s.phase == "Downloading"]
    assert any(0 < s.done_bytes < s.total_bytes for s in downloading), downloading
    assert downloading[-1].total_bytes >= (tiny_dir / "model.safetensors").stat().st_size
    # the server says Ready before /health turns 200 (and /status is read after /health)
    assert all(status.phase == "Ready" for status, health in seen if health == 200)
    assert all(health == 503 for status, health in seen[:-1])
    ready, _ = seen[-1]
    assert (ready.revision, ready.reason) == (commit, None)


# Run as `python -c PROBE --model ...`: the first import of torch (and of transformers) asks the process's own
# `/status` first, from the importing thread, and records the answer (or why there was none).
PROBE = """
import importlib.abc, json, os, runpy, sys, urllib.request

class Probe(importlib.abc.MetaPathFinder):
    seen = {}

    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "transformers") and name not in self.seen:
            self.seen[name] = {}
            try:
                with urllib.request.urlopen(os.environ["PROBE_URL"], timeout=30) as answer:
                    self.seen[name] = {"status": answer.status, "body": json.load(answer)}
            except OSError as exc:
                self.seen[name] = {"error": repr(exc)}
            with open(os.environ["PROBE_OUT"], "w") as out:
                json.dump(self.seen, out)
        return None

sys.meta_path.insert(0, Probe())
runpy.run_module("llm_serving", run_name="__main__", alter_sys=True)
"""


def test_the_port_answers_before_torch_or_transformers_is_imported(tiny_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "probe.json"
    env = server_env(API_KEY, PROBE_URL=f"http://127.0.0.1:{port}{STATUS_PATH}", PROBE_OUT=str(out))
    cmd = [sys.executable, "-c", PROBE, "--host", "127.0.0.1", "--port", str(port), "--model", str(tiny_dir)]
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline and process.poll() is None:
            if out.is_file() and len(json.loads(out.read_text() or "{}")) == 2:
                break
            time.sleep(0.1)
        probes = json.loads(out.read_text())
    finally:
        process.terminate()
        process.wait(timeout=60)
    for name in ("torch", "transformers"):
        assert probes[name].get("status") == 200, (name, probes, log.read_text(errors="replace")[-3000:])
        assert LoadStatus.from_json(probes[name]["body"]).phase == "Starting"


@pytest.mark.parametrize(
    ("model", "reason", "says"),
    [
        ("/nonexistent/model-dir", "ModelNotFound", "/nonexistent/model-dir"),
        ("BAD_DIR", "LoadFailed", "hidden_size"),
    ],
)
def test_a_failed_load_exits_with_the_failure_line_last_on_stderr(
    tmp_path: Path, model: str, reason: str, says: str
) -> None:
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "wide"}))
    args = ["--model", str(bad) if model == "BAD_DIR" else model, "--host", "127.0.0.1", "--port"]
    result = subprocess.run(
        [sys.executable, "-m", "llm_serving", *args, str(free_port())],
        env=server_env(API_KEY),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=STARTUP_SECONDS,
    )
    assert result.returncode != 0
    last = result.stderr.rstrip("\n").splitlines()[-1]
    status = parse_failure(result.stderr[-4096:])
    assert status is not None, result.stderr[-3000:]
    assert last == failure_line(status)
    assert (status.phase, status.reason) == ("Failed", reason)
    assert status.message is not None
    assert says in status.message
    assert "Finished server process" in result.stderr  # uvicorn's shutdown came first
