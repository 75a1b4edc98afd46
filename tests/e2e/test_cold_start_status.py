"""Cold start through the whole system, from a STAND-IN Hugging Face Hub (`llm_devstack.hub`; no Hub can be
reached here) that the operator resolves revisions on and the pods download from (`--hf-endpoint`).

A tiny random-weight Llama (25 MB of safetensors) is served as a Hub repo: its download, slowed by the
stand-in Hub, shows in the LLMEndpoint's status; the commit `main` resolves to is recorded and loaded by a
replica started after `main` moved; each load failure is the endpoint's reason; a pod killed mid-download
resumes from what it had (its weight cache on a host folder, `spec.cache`, survives the container's
restart).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import InferenceClient

from llm_contract import SERVING_PORT, STATUS_PATH, LoadStatus
from llm_devstack.hub import StandInHub
from llm_devstack.waits import wait_for
from llm_operator.objects import conditions
from tests.cluster.operator_support import get, kubectl_apply
from tests.e2e.conftest import HubStack, Stack, container_processes
from tests.serving.models import tiny_model_dir

pytestmark = pytest.mark.cluster
REPO = "e2e/tiny"
WEIGHTS = "model.safetensors"
DOWNLOADING = re.compile(r"Downloading ([\d.]+)/([\d.]+) MB \((\d+)%\)")
THROTTLE = 2_000_000
"""Bytes per second the stand-in Hub sends while a test watches a download (the weights take ~13 s)."""


@pytest.fixture(scope="module")
def hub(hub_stack: HubStack) -> StandInHub:
    """The stand-in Hub with the tiny model as `e2e/tiny` (branch main)."""
    hub_stack.hub.add_repo(REPO, tiny_model_dir())
    return hub_stack.hub


@pytest.fixture(scope="module")
def stack(hub_stack: HubStack) -> Stack:
    """This module's stack: the one whose operator and pods use the stand-in Hub."""
    return hub_stack.stack


def endpoint(stack: Stack, name: str, cache: Path | None = None) -> dict[str, Any]:
    """A Hub-model endpoint with one replica that stays up; HF_HOME in each container's own filesystem,
    unless a weight cache volume on the host folder `cache` (one for all its pods and their restarts)."""
    return stack.endpoint(
        name,
        cache or False,
        model={"repository": REPO, "dtype": "float32"},
        scaling={"minReplicas": 1, "maxReplicas": 2},
    )


def status(stack: Stack, name: str) -> dict[str, Any]:
    return dict(get(stack.cluster, "llmendpoint", name, "-n", stack.namespace).get("status") or {})


def pods(stack: Stack, name: str) -> list[dict[str, Any]]:
    listed = get(stack.cluster, "pods", "-n", stack.namespace, "-l", f"llm-endpoints.io/endpoint={name}")
    return [p for p in listed.get("items", []) if not p["metadata"].get("deletionTimestamp")]


def ready_message(current: dict[str, Any]) -> str:
    """The message of the endpoint's Ready condition (what `kubectl get llme` shows)."""
    return str(conditions({"status": current}).get("Ready", {}).get("message", ""))


def running(stack: Stack, name: str, timeout: float = 300, *, crashed: bool = False) -> dict[str, Any]:
    """The endpoint's status once Running; it must not fail on the way, unless a pod `crashed` (the
    endpoint is Failed, CrashLoopBackOff, until the restarted container loads)."""

    def reached() -> dict[str, Any] | None:
        current = status(stack, name)
        assert crashed or current.get("phase") != "Failed", current
        return current if current.get("phase") == "Running" else None

    return wait_for(reached, timeout, f"{name} Running")


def load_status(pod: dict[str, Any]) -> LoadStatus:
    """The replica's own `/status`."""
    answer = httpx.get(f"http://{pod['status']['podIP']}:{SERVING_PORT}{STATUS_PATH}", timeout=10)
    return LoadStatus.from_json(answer.json())


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


def test_download_progress_shows_in_status_then_the_endpoint_answers(stack: Stack, hub: StandInHub) -> None:
    hub.throttle = THROTTLE
    try:
        kubectl_apply(stack.cluster, endpoint(stack, "progress"))
        seen: list[tuple[float, float, int]] = []

        def downloaded() -> bool:
            current = status(stack, "progress")
            assert current.get("phase") != "Failed", current
            if found := DOWNLOADING.fullmatch(ready_message(current)):
                shown = (float(found[1]), float(found[2]), int(found[3]))
                if not seen or seen[-1] != shown:
                    seen.append(shown)
            return len(seen) >= 3 or hub.served_bytes(REPO, WEIGHTS) >= len(_weights())

        wait_for(downloaded, 240, "the download's progress in the endpoint's status", interval=0.3)
    finally:
        hub.throttle = None
    assert len(seen) >= 2, seen
    done = [d for d, _, _ in seen]
    assert done == sorted(done), seen
    assert done[0] < done[-1], seen
    assert all(total == seen[0][1] and total > 20 for _, total, _ in seen), seen  # 25 MB in all
    assert all(0 <= p <= 100 for _, _, p in seen)

    current = running(stack, "progress")
    assert current["model"]["resolvedRevision"] == hub_commit(hub, "main")
    answer = InferenceClient(current["url"], timeout=120).text_generation("Hello", max_new_tokens=4)
    assert isinstance(answer, str)


def _weights() -> bytes:
    return (tiny_model_dir() / WEIGHTS).read_bytes()


def hub_commit(hub: StandInHub, revision: str) -> str:
    """The commit the stand-in Hub resolves `revision` of REPO to (through its own API)."""
    answer = httpx.get(f"{hub.url}/api/models/{REPO}/revision/{revision}", timeout=10)
    return str(answer.json()["sha"])


def test_a_replica_started_after_main_moved_loads_the_recorded_commit(stack: Stack, hub: StandInHub) -> None:
    recorded = running(stack, "progress")["model"]["resolvedRevision"]
    moved = hub.commit(REPO, {"README.md": b"a newer commit on main\n"})
    assert hub_commit(hub, "main") == moved != recorded
    hub.clear_log()
    first = {p["metadata"]["name"] for p in pods(stack, "progress")}
    body = endpoint(stack, "progress")
    body["spec"]["scaling"]["minReplicas"] = 2
    kubectl_apply(stack.cluster, body)

    def second_ready() -> dict[str, Any] | None:
        new = [p for p in pods(stack, "progress") if p["metadata"]["name"] not in first]
        ready = [p for p in new if conditions(p).get("Ready", {}).get("status") == "True"]
        return ready[0] if ready else None

    second = wait_for(second_ready, 300, "a second replica ready")
    assert load_status(second).revision == recorded
    asked = [r for r in hub.log if r.repo_id == REPO]
    assert any(r.file == WEIGHTS and r.method == "GET" for r in asked), asked  # its own download
    assert {r.commit for r in asked} == {recorded}, asked
    assert status(stack, "progress")["model"]["resolvedRevision"] == recorded
    stack.cluster.kubectl("delete", "llmendpoint", "progress", "-n", stack.namespace, "--wait=false")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs: a cache volume too small for the weights."""
    folder = tmp_path / "small"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def failed(stack: Stack, name: str, reason: str) -> dict[str, Any]:
    """The endpoint once Failed with `reason`; the pods must not have crash-looped to get there."""

    def reached() -> dict[str, Any] | None:
        current = status(stack, name)
        ready = conditions({"status": current}).get("Ready", {})
        if current.get("phase") == "Failed" and ready.get("reason") != reason:
            ready = {}  # a passing reason (e.g. the kubelet's) before the server's own; wait for it
        return current if ready.get("reason") == reason else None

    current = wait_for(reached, 240, f"{name} Failed with {reason}")
    assert current["phase"] == "Failed"
    restarts = [
        s.get("restartCount", 0) for p in pods(stack, name) for s in p["status"].get("containerStatuses", [])
    ]
    assert all(r <= 2 for r in restarts), restarts
    return current


@pytest.mark.parametrize(
    ("name", "model", "reason"),
    [
        ("missing", {"repository": "e2e/no-such-model"}, "ModelNotFound"),
        ("badrev", {"repository": REPO, "revision": "no-such-branch"}, "RevisionNotFound"),
        ("private", {"repository": "e2e/private"}, "ModelAccessDenied"),
    ],
)
def test_the_operator_fails_what_the_hub_refuses_with_its_reason(
    stack: Stack, hub: StandInHub, name: str, model: dict[str, str], reason: str
) -> None:
    if name == "private":
        hub.add_repo("e2e/private", {"config.json": b"{}"}, private=True, tokens={"hf_someone_else"})
    body = endpoint(stack, name)
    body["spec"]["model"] = {**model, "dtype": "float32"}
    kubectl_apply(stack.cluster, body)
    current = failed(stack, name, reason)
    ready = conditions({"status": current})["Ready"]
    assert ready["message"], ready
    assert not pods(stack, name)  # nothing is rendered for a revision that has no commit
    stack.cluster.kubectl("delete", "llmendpoint", name, "-n", stack.namespace, "--wait=false")


def test_corrupt_weights_fail_the_endpoint_from_the_pods_termination_message(
    stack: Stack, hub: StandInHub
) -> None:
    hub.add_repo("e2e/corrupt", tiny_model_dir())
    hub.corrupt("e2e/corrupt", WEIGHTS)
    body = endpoint(stack, "corrupt")
    body["spec"]["model"]["repository"] = "e2e/corrupt"
    kubectl_apply(stack.cluster, body)
    current = failed(stack, "corrupt", "WeightsCorrupt")
    assert WEIGHTS in conditions({"status": current})["Ready"]["message"]

    def exit_reported() -> dict[str, Any] | None:
        """The container's exit, once the kubelet reports it (the operator may read the pod's `/status` in
        phase Failed before the process has exited)."""
        (pod,) = pods(stack, "corrupt")
        (container,) = pod["status"].get("containerStatuses") or [{}]
        state, last = container.get("state") or {}, container.get("lastState") or {}
        return state.get("terminated") or last.get("terminated")

    terminated = wait_for(exit_reported, 60, "the corrupt pod's exit in its status")
    assert terminated["exitCode"] != 0
    assert "WeightsCorrupt" in terminated["message"]
    stack.cluster.kubectl("delete", "llmendpoint", "corrupt", "-n", stack.namespace, "--wait=false")


def test_a_full_cache_fails_the_endpoint_with_cache_full(
    stack: Stack, hub: StandInHub, small_tmpfs: Path
) -> None:
    kubectl_apply(stack.cluster, endpoint(stack, "full", small_tmpfs))
    failed(stack, "full", "CacheFull")
    stack.cluster.kubectl("delete", "llmendpoint", "full", "-n", stack.namespace, "--wait=false")


def test_a_pod_killed_mid_download_resumes_it(stack: Stack, hub: StandInHub, cache: Path) -> None:
    size = len(_weights())
    hub.clear_log()
    hub.throttle = THROTTLE
    try:
        kubectl_apply(stack.cluster, endpoint(stack, "resume", cache / "resume"))
        wait_for(lambda: hub.served_bytes(REPO, WEIGHTS) > size // 3, 240, "a third of the weights sent")
        (pod,) = pods(stack, "resume")
        for process in container_processes(pod):
            process.kill()  # as the OOM killer or a node failure would: no chance to clean up
        time.sleep(1)
        hub.throttle = None
        running(stack, "resume", crashed=True)
    finally:
        hub.throttle = None
    gets = [r for r in hub.log if r.repo_id == REPO and r.file == WEIGHTS and r.method == "GET"]
    assert len(gets) >= 2, gets
    assert gets[0].range_start in (None, 0)
    assert any((r.range_start or 0) > 0 for r in gets[1:]), gets  # it asked only for what it lacked
    assert hub.served_bytes(REPO, WEIGHTS) < 2 * size
    stack.cluster.kubectl("delete", "llmendpoint", "resume", "-n", stack.namespace, "--wait=false")
