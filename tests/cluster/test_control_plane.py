"""The local control plane behaves as a real cluster: the signals the operator will read are there."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from llm_devstack.controlplane import Cluster
from llm_devstack.waits import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def api(cluster: Cluster) -> Iterator[k8s.ApiClient]:
    with cluster.api_client() as client:
        yield client


@pytest.fixture
def namespace(api: k8s.ApiClient) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    k8s.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    yield name
    k8s.CoreV1Api(api).delete_namespace(name)


def gpu_deployment(name: str, gpus: int, replicas: int = 1) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "serving",
                            "image": "llm-endpoints/serving:test",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ]
                },
            },
        },
    }


def test_namespace_configmap_and_crd_round_trip(cluster: Cluster, api: k8s.ApiClient, namespace: str) -> None:
    core = k8s.CoreV1Api(api)
    assert core.read_namespace(namespace).status.phase == "Active"
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"model": "smollm2"}}
    )
    assert core.read_namespaced_config_map("settings", namespace).data == {"model": "smollm2"}

    group = f"{namespace}.test.llm-endpoints.io"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    extensions = k8s.ApiextensionsV1Api(api)
    extensions.create_custom_resource_definition(crd)
    try:
        wait_for(
            lambda: any(
                c.type == "Established" and c.status == "True"
                for c in extensions.read_custom_resource_definition(f"widgets.{group}").status.conditions
                or ()
            ),
            60,
            "the CRD to be established",
        )
        custom = k8s.CustomObjectsApi(api)
        widget = {
            "apiVersion": f"{group}/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"size": 3},
        }
        custom.create_namespaced_custom_object(group, "v1", namespace, "widgets", widget)
        assert custom.get_namespaced_custom_object(group, "v1", namespace, "widgets", "w")["spec"] == {
            "size": 3
        }
        bad = {**widget, "metadata": {"name": "bad"}, "spec": {"size": 0}}
        with pytest.raises(ApiException) as refused:
            custom.create_namespaced_custom_object(group, "v1", namespace, "widgets", bad)
        assert refused.value.status == 422
        assert "spec.size" in refused.value.body

        listed = json.loads(cluster.kubectl("get", f"widgets.{group}", "-n", namespace, "-o", "json").stdout)
        assert [item["metadata"]["name"] for item in listed["items"]] == ["w"]
        table = cluster.kubectl("get", "configmap", "settings", "-n", namespace).stdout
        assert table.split()[:3] == ["NAME", "DATA", "AGE"]
        assert "settings" in table
    finally:
        extensions.delete_custom_resource_definition(f"widgets.{group}")


def test_gpu_deployment_becomes_running_pods_on_gpu_nodes(api: k8s.ApiClient, namespace: str) -> None:
    k8s.AppsV1Api(api).create_namespaced_deployment(namespace, gpu_deployment("llm", gpus=2, replicas=2))
    core = k8s.CoreV1Api(api)

    def running_pods() -> list[k8s.V1Pod] | None:
        pods = core.list_namespaced_pod(namespace, label_selector="app=llm").items
        running = [p for p in pods if p.status.phase == "Running"]
        return running if len(running) == 2 else None

    pods = wait_for(running_pods, 60, "two Running GPU pods")
    replica_sets = k8s.AppsV1Api(api).list_namespaced_replica_set(namespace).items
    assert len(replica_sets) == 1
    for pod in pods:
        assert pod.metadata.owner_references[0].kind == "ReplicaSet"
        assert pod.metadata.owner_references[0].name == replica_sets[0].metadata.name
        node = core.read_node(pod.spec.node_name)
        assert int(node.status.allocatable["nvidia.com/gpu"]) >= 2
        assert node.metadata.labels["nvidia.com/gpu.product"]
        assert any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)
    deployment = wait_for(
        lambda: (
            (d := k8s.AppsV1Api(api).read_namespaced_deployment("llm", namespace)).status.ready_replicas == 2
            and d
        ),
        60,
        "the Deployment to report 2 ready replicas",
    )
    assert deployment.status.available_replicas == 2


def test_oversized_gpu_request_stays_pending_with_failed_scheduling_event(
    api: k8s.ApiClient, namespace: str
) -> None:
    k8s.AppsV1Api(api).create_namespaced_deployment(namespace, gpu_deployment("huge", gpus=16))
    core = k8s.CoreV1Api(api)

    def scheduling_failure() -> str | None:
        events = core.list_namespaced_event(namespace, field_selector="reason=FailedScheduling").items
        return events[0].message if events else None

    message = wait_for(scheduling_failure, 60, "a FailedScheduling event")
    assert "Insufficient nvidia.com/gpu" in message
    assert message.startswith("0/")
    pods = core.list_namespaced_pod(namespace, label_selector="app=huge").items
    assert [p.status.phase for p in pods] == ["Pending"]
    unschedulable = [c for c in pods[0].status.conditions if c.type == "PodScheduled"]
    assert unschedulable[0].status == "False"
    assert unschedulable[0].reason == "Unschedulable"


def test_deleting_an_owner_cascades_to_its_dependents(api: k8s.ApiClient, namespace: str) -> None:
    core = k8s.CoreV1Api(api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    for name in ("child-a", "child-b"):
        core.create_namespaced_config_map(
            namespace, {"metadata": {"name": name, "ownerReferences": [reference]}}
        )
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "bystander"}})

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def only_bystander_left() -> bool:
        names = {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}
        return names - {"kube-root-ca.crt"} == {"bystander"}

    wait_for(only_bystander_left, 60, "the garbage collector to delete the dependents")
