"""Helpers the cluster, gateway and end-to-end tests share: stand-in Deployments, `kubectl apply` and
`get`, status conditions. The control plane, the component processes and the waits are the dev stack's
(`llm_devstack`)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from typing import Any

import yaml

from llm_devstack.controlplane import Cluster
from llm_operator.contract import ENDPOINT_LABEL


def stand_in_deployment(
    name: str, namespace: str, replicas: int, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """A Deployment in place of an endpoint's serving one, labelled with the endpoint's name, whose pods
    never start (its image does not exist): for tests of what reads or scales Deployments."""
    labels = {ENDPOINT_LABEL: name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {**labels, **(extra_labels or {})}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "server", "image": "registry.invalid/none"}]},
            },
        },
    }


def kubectl_apply(
    cluster: Cluster, *bodies: dict[str, Any], check: bool = True, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """`kubectl apply -f -` of the manifests."""
    text = yaml.safe_dump_all(list(bodies))
    return cluster.kubectl("apply", "-f", "-", *extra, input=text, check=check)


def get(cluster: Cluster, *args: str) -> dict[str, Any]:
    """`kubectl get ... -o json`, or {} when not found."""
    result = cluster.kubectl("get", *args, "-o", "json", "--show-managed-fields", check=False)
    if result.returncode != 0:
        if "NotFound" in result.stderr or "not found" in result.stderr:
            return {}
        raise AssertionError(result.stderr)
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """A condition of an object's status, or {}."""
    return next((c for c in body.get("status", {}).get("conditions") or () if c.get("type") == kind), {})
