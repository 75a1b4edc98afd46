"""The local node agent (test infrastructure standing in for a kubelet) runs pods as local processes."""

from __future__ import annotations

import base64
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from kubernetes import client as k8s

from llm_devstack.controlplane import Cluster
from llm_devstack.node_agent import AGENT_PLACEMENT
from llm_devstack.waits import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def core(cluster: Cluster) -> Iterator[k8s.CoreV1Api]:
    with cluster.api_client() as api:
        yield k8s.CoreV1Api(api)


@pytest.fixture
def namespace(core: k8s.CoreV1Api) -> Iterator[str]:
    name = f"agent-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def pod(name: str, command: list[str], **container: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            **AGENT_PLACEMENT,
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "serving",
                    "image": "not-pulled",
                    "command": command,
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                    **container,
                }
            ],
        },
    }


HTTP_SERVER = [sys.executable, "-m", "http.server", "--bind", "0.0.0.0", "$(PORT)"]


def test_a_pod_runs_as_a_local_process_and_becomes_ready(
    cluster: Cluster, core: k8s.CoreV1Api, namespace: str, local_node: str
) -> None:
    node = core.read_node(local_node)
    assert node.status.allocatable["nvidia.com/gpu"] == "4"
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "tok"}, "data": {"t": base64.b64encode(b"s3").decode()}}
    )
    body = pod(
        "web",
        [*HTTP_SERVER],
        ports=[{"name": "http", "containerPort": 18080}],
        env=[
            {"name": "PORT", "value": "18080"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "t"}}},
            {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        readinessProbe={"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    )
    core.create_namespaced_pod(namespace, body)

    def ready() -> Any:
        current = core.read_namespaced_pod("web", namespace)
        conditions = {c.type: c.status for c in current.status.conditions or ()}
        return current if conditions.get("Ready") == "True" else None

    running = wait_for(ready, 60, "the pod to be Ready")
    assert running.spec.node_name == local_node
    assert running.status.phase == "Running"
    assert running.status.pod_ip.startswith("10.245.")  # its own network namespace
    with urllib.request.urlopen(f"http://{running.status.pod_ip}:18080/", timeout=5) as response:
        assert response.status == 200
    (process,) = [
        p
        for p in psutil.process_iter(["cmdline", "environ"])
        if "http.server" in " ".join(p.info["cmdline"] or ()) and (p.info["environ"] or {}).get("ME") == "web"
    ]
    assert process.environ()["TOKEN"] == "s3"

    core.delete_namespaced_pod("web", namespace)
    process.wait(30)  # SIGTERM from the agent ends it (psutil waits on a process that is not our child)
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, 60, "the pod object to be removed")


def test_a_crashing_container_is_restarted_with_back_off(
    core: k8s.CoreV1Api, namespace: str, local_node: str
) -> None:
    core.create_namespaced_pod(namespace, pod("crash", [sys.executable, "-c", "raise SystemExit(3)"]))

    def restarted() -> Any:
        status = core.read_namespaced_pod("crash", namespace).status
        statuses = status.container_statuses or []
        return statuses[0] if statuses and statuses[0].restart_count >= 2 else None

    container = wait_for(restarted, 60, "two restarts")
    assert container.last_state.terminated.exit_code == 3
    assert container.ready is False


def test_a_pod_acts_as_its_service_account(
    cluster: Cluster, core: k8s.CoreV1Api, namespace: str, local_node: str
) -> None:
    whoami = [
        str(cluster.bin_dir / "kubectl"),
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]
    core.create_namespaced_pod(namespace, pod("who", whoami))
    log = cluster.pod_log(namespace, "who")
    expected = f"system:serviceaccount:{namespace}:default"
    wait_for(lambda: log.exists() and expected in log.read_text(), 60, f"{expected} in {log}")


def test_a_failed_container_reports_its_log_tail_as_termination_message(
    core: k8s.CoreV1Api, namespace: str, local_node: str
) -> None:
    script = "import sys; print('x' * 3000); print('the cache is full'); sys.exit(3)"
    body = pod(
        "fail",
        [sys.executable, "-c", script],
        terminationMessagePolicy="FallbackToLogsOnError",
    )
    core.create_namespaced_pod(namespace, body)

    def exited() -> Any:
        statuses = core.read_namespaced_pod("fail", namespace).status.container_statuses or []
        return statuses[0].last_state.terminated if statuses and statuses[0].last_state.terminated else None

    terminated = wait_for(exited, 60, "a terminated last state")
    assert terminated.exit_code == 3
    assert terminated.reason == "Error"
    assert terminated.started_at <= terminated.finished_at
    assert terminated.message.endswith("the cache is full\n")
    assert len(terminated.message.encode()) <= 2048  # the kubelet's cap: the 3000-byte line is cut


def test_a_container_that_succeeds_or_has_the_file_policy_reports_no_log_message(
    core: k8s.CoreV1Api, namespace: str, local_node: str
) -> None:
    core.create_namespaced_pod(namespace, pod("done", [sys.executable, "-c", "print('fine')"]))
    core.create_namespaced_pod(
        namespace, pod("file", [sys.executable, "-c", "print('oops'); raise SystemExit(2)"])
    )

    def exits() -> Any:
        found = {}
        for name in ("done", "file"):
            statuses = core.read_namespaced_pod(name, namespace).status.container_statuses or []
            if not (statuses and statuses[0].last_state.terminated):
                return None
            found[name] = statuses[0].last_state.terminated
        return found

    found = wait_for(exits, 60, "both containers to have exited")
    assert (found["done"].exit_code, found["done"].reason, found["done"].message) == (0, "Completed", None)
    assert (found["file"].exit_code, found["file"].reason, found["file"].message) == (2, "Error", None)
