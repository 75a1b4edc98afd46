"""The local system `make run` and the cold-start benchmark start: a control plane with the real node
untainted (kubelet and containerd running the images `make images` built), the CRD, the gateway and the
operator as processes on this machine (on the node's bridge: they reach pod IPs), and a wait for an endpoint
to be Running."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llm_devstack.controlplane import Cluster, HarnessError
from llm_devstack.images import SERVING_IMAGE
from llm_devstack.node.network import POD_RANGE
from llm_devstack.node.volumes import HOST_STORAGE, host_volume
from llm_devstack.paths import CACHE, EXAMPLES
from llm_devstack.processes import ComponentProcess, GatewayProcess
from llm_devstack.resources import install_crd
from llm_operator.objects import conditions
from llm_operator.render import OPTIONAL_CHILDREN

EXAMPLE = EXAMPLES / "smollm2.yaml"
WEIGHTS = CACHE / "weights"
"""Where the example's weight cache lives on this machine, one folder per endpoint: the pods' HF_HOME, so
SmolLM2's GGUF is converted to safetensors once per machine, not at every pod start."""
WEIGHTS_SIZE = "2Gi"
CACHE_CLAIM = OPTIONAL_CHILDREN[("v1", "PersistentVolumeClaim")]
"""An endpoint's weight cache claim, `{name}-cache`."""


def host_cache(cluster: Cluster, namespace: str, name: str, folder: Path, size: str) -> dict[str, str]:
    """The `spec.cache` of endpoint `name` whose weight cache claim is bound in advance to a hostPath volume
    of `size` on the real node, showing `folder`."""
    host_volume(cluster, namespace, CACHE_CLAIM.format(name=name), folder, size)
    return {"size": size, "storageClassName": HOST_STORAGE}


def apply_example(cluster: Cluster, namespace: str = "default") -> str:
    """Applies examples/smollm2.yaml with a weight cache (`spec.cache`) on a hostPath volume of the real
    node under WEIGHTS (the example itself names none, so that it runs on any cluster); returns its name."""
    body = yaml.safe_load(EXAMPLE.read_text())
    name = str(body["metadata"]["name"])
    body["spec"]["cache"] = host_cache(cluster, namespace, name, WEIGHTS / name, WEIGHTS_SIZE)
    cluster.kubectl("apply", "--namespace", namespace, "-f", "-", input=yaml.safe_dump(body))
    return name


READY_TIMEOUT = 900.0


def endpoint_status(cluster: Cluster, name: str) -> dict[str, Any]:
    result = cluster.kubectl("get", "llmendpoint", name, "-o", "json", check=False)
    return dict(json.loads(result.stdout).get("status") or {}) if result.returncode == 0 else {}


def wait_running(cluster: Cluster, name: str, processes: dict[str, ComponentProcess]) -> dict[str, Any]:
    """Prints each phase and reason change until the endpoint is Running."""
    deadline, last = time.monotonic() + READY_TIMEOUT, ""
    while time.monotonic() < deadline:
        for component, process in processes.items():
            if not process.alive:
                raise HarnessError(f"the {component} exited; see {cluster.workdir}/logs")
        status = endpoint_status(cluster, name)
        ready = conditions({"status": status}).get("Ready", {})
        line = (
            f"{status.get('phase', 'Pending')}: {ready.get('reason', '')} {ready.get('message', '')}".strip()
        )
        if line != last:
            print(f"make run: {name} is {line}", flush=True)
            last = line
        if status.get("phase") == "Running":
            return status
        time.sleep(1)
    raise HarnessError(
        f"{name} not Running after {READY_TIMEOUT:.0f}s; see {cluster.workdir}/logs and `kubectl logs`"
    )


@dataclass
class LocalStack:
    """The running local system: its control plane, the gateway's URLs and the component processes."""

    cluster: Cluster
    gateway_url: str
    gateway_admin_url: str
    """Its /metrics, /healthz and /readyz."""
    processes: dict[str, ComponentProcess]


@contextlib.contextmanager
def local_stack(workdir: Path) -> Iterator[LocalStack]:
    """Control plane, the real node untainted, the CRD, the gateway and the operator, all stopped on exit."""
    with Cluster(workdir) as cluster:
        cluster.start(nodes=())
        cluster.start_real_node("local-0", gpus=4, taint=False)
        install_crd(cluster)
        logs = cluster.logs
        # the pods' network is inside (for private endpoints); calls from this machine come from outside
        internal = f"--internal-cidr={POD_RANGE}"
        gateway = GatewayProcess(cluster.kubeconfig, logs / "gateway.log", "--host=127.0.0.1", internal)
        operator = ComponentProcess(
            "llm_operator",
            logs / "operator.log",
            [
                f"--kubeconfig={cluster.kubeconfig}",
                "--no-leader-election",
                f"--gateway-url={gateway.url}",
                f"--gateway-metrics-url={gateway.admin_url}/metrics",
                f"--image={SERVING_IMAGE}",
            ],
        )
        with gateway, operator:
            processes: dict[str, ComponentProcess] = {"gateway": gateway, "operator": operator}
            yield LocalStack(cluster, gateway.url, gateway.admin_url, processes)
