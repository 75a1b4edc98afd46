"""`compute_status(...)`: what an endpoint's children say about it, as its status. Pure.

Phases: Pending (not placed or not started), Loading (started, not yet ready), Running (at least one ready
replica), ScaledToZero (no replica wanted), Paused (`spec.paused`: held at zero, requests refused), Failed (no
ready replica and something a person must fix).
A loading replica's `/status` (read by `loadprobe.py`) gives the Loading reason and message
(`Downloading 6.9/16.1 GB (43%)`); a serving container whose termination message is a load failure
(`llm_contract.parse_failure`) makes the endpoint Failed with its reason, even while its restarts back off.
Conditions follow metav1.Condition, so kstatus (Argo CD, Flux) reads `Ready` and `observedGeneration`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

import pydantic

from llm_contract import LoadStatus, parse_failure
from llm_operator import progress
from llm_operator.api.accelerators import GPU_RESOURCE
from llm_operator.api.v1alpha1 import Condition, ConditionType, LLMEndpoint, LLMEndpointStatus, Phase
from llm_operator.objects import Manifest, condition_true, conditions
from llm_operator.revision import HUB_UNREACHABLE

# container waiting reasons that need a person, most telling first
BROKEN_WAITING = (
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
)
_ERR_IMAGE = {"ErrImagePull": "ImagePullBackOff"}


@dataclass(frozen=True)
class Finding:
    """One fact about the endpoint's pods or Deployment, with a reason and a message a person can act on."""

    reason: str
    message: str


@dataclass(frozen=True)
class Observation:
    """The facts compute_status decides from."""

    desired: int
    ready: int
    rolling_out: bool
    live_pods: int
    broken: Finding | None
    unschedulable: Finding | None
    loading: Finding | None
    starting: Finding | None
    paused: bool = False
    refused: Finding | None = None
    """Why the operator renders nothing for the endpoint (see policy.py), if it does not."""
    resolving: Finding | None = None
    """Why the model's revision is not resolved yet, while the Hub cannot be asked (retried)."""


def _event_time(event: Manifest) -> str:
    for key in ("lastTimestamp", "eventTime", "firstTimestamp"):
        if event.get(key):
            return str(event[key])
    return str(event.get("metadata", {}).get("creationTimestamp", ""))


def scheduler_message(pod: Manifest, events: list[Manifest]) -> str:
    """The scheduler's latest word on why a pod is not placed: its FailedScheduling event, else the
    pod's PodScheduled condition."""
    name = pod["metadata"]["name"]
    mine = [
        e
        for e in events
        if e.get("reason") == "FailedScheduling" and e.get("involvedObject", {}).get("name") == name
    ]
    if mine:
        return str(max(mine, key=_event_time).get("message", "")).strip()
    return str(conditions(pod).get("PodScheduled", {}).get("message", "")).strip()


def _waiting(pod: Manifest) -> tuple[str, str] | None:
    """(reason, message) of the pod's worst waiting container, if one is broken."""
    found: list[tuple[int, str, str]] = []
    for status in pod.get("status", {}).get("containerStatuses") or ():
        waiting = status.get("state", {}).get("waiting") or {}
        reason = waiting.get("reason", "")
        if reason not in BROKEN_WAITING:
            continue
        message = str(waiting.get("message", "")).strip()
        terminated = status.get("lastState", {}).get("terminated")
        if reason == "CrashLoopBackOff" and terminated:
            exit_reason = terminated.get("reason", "Error")
            restarts = status.get("restartCount", 0)
            message = f"last exit {terminated.get('exitCode', '?')} ({exit_reason}) after {restarts} restarts"
        found.append((BROKEN_WAITING.index(reason), _ERR_IMAGE.get(reason, reason), message))
    if not found:
        return None
    _, reason, message = min(found)
    return reason, message


def load_failure(pod: Manifest) -> LoadStatus | None:
    """The load failure a container of the pod reported as its termination message (now or last time)."""
    for status in pod.get("status", {}).get("containerStatuses") or ():
        for state in (status.get("state") or {}, status.get("lastState") or {}):
            message = (state.get("terminated") or {}).get("message")
            if message and (failure := parse_failure(str(message))) is not None:
                return failure
    return None


def observe(
    endpoint: LLMEndpoint,
    deployment: Manifest | None,
    pods: list[Manifest],
    events: list[Manifest],
    loads: Mapping[str, LoadStatus] | None = None,
) -> Observation:
    """Reduce the children to the facts that decide phase and conditions; `loads`: the `/status` of the
    loading pods that answered, by pod name."""
    loads = loads or {}
    paused = endpoint.spec.paused
    if deployment is None:  # a new Deployment starts one replica (a paused one is scaled down at once)
        return Observation(1, 0, True, 0, None, None, None, None, paused)
    spec, state = deployment.get("spec", {}), deployment.get("status", {})
    desired = int(spec.get("replicas", 1))
    ready = int(state.get("readyReplicas") or 0)
    generation = deployment.get("metadata", {}).get("generation", 0)
    rolling_out = (
        state.get("observedGeneration", 0) < generation or int(state.get("updatedReplicas") or 0) < desired
    )
    live = [
        p
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
        and p.get("status", {}).get("phase") in (None, "Pending", "Running")
    ]

    broken = unschedulable = loading = starting = None
    found = conditions(deployment)
    failure = found.get("ReplicaFailure", {})
    if failure.get("status") == "True":
        broken = Finding(failure.get("reason") or "ReplicaFailure", str(failure.get("message", "")))
    progressing = found.get("Progressing", {})
    if progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        broken = broken or Finding("ProgressDeadlineExceeded", str(progressing.get("message", "")))

    waiting_pods = [(p, w) for p in live if (w := _waiting(p))]
    if waiting_pods:
        reason, message = min((w for _, w in waiting_pods), key=lambda w: BROKEN_WAITING.index(w[0]))
        count = sum(1 for _, w in waiting_pods if w[0] == reason)
        broken = Finding(reason, f"{count} pod(s) in {reason}: {message}".rstrip(": "))
    failures = [f for p in live if (f := load_failure(p))]
    if (reported := progress.failed(list(loads.values()))) is not None:
        failures.append(reported)
    if failures:  # what to fix, said by the server itself: before the kubelet's back-off
        broken = Finding(
            failures[0].reason or "LoadFailed", failures[0].message or "the model failed to load"
        )

    pending = [p for p in live if conditions(p).get("PodScheduled", {}).get("reason") == "Unschedulable"]
    if pending:
        gpus = endpoint.spec.gpus
        what = f"{gpus} {GPU_RESOURCE}" if gpus else "a node"
        if endpoint.spec.accelerator:
            what += f" ({endpoint.spec.accelerator.type})"
        said = scheduler_message(pending[0], events)
        short_of_gpus = gpus and (not said or GPU_RESOURCE in said or "affinity" in said)
        reason = "WaitingForGPU" if short_of_gpus else "Unschedulable"
        unschedulable = Finding(reason, f"{len(pending)} pod(s) need {what}: {said}")

    not_ready = [p for p in live if not condition_true(p, "Ready") and p not in pending]
    running = [p for p in not_ready if p.get("status", {}).get("phase") == "Running"]
    if running:
        read = [loads[p["metadata"]["name"]] for p in running if p["metadata"]["name"] in loads]
        shown = progress.loading_message(read, len(running))
        loading = (
            Finding(*shown)
            if shown
            else Finding("ModelLoading", f"{len(running)} replica(s) loading {_model_name(endpoint)}")
        )
    if len(running) < len(not_ready):
        starting = Finding("ContainerCreating", f"{len(not_ready) - len(running)} pod(s) starting")
    return Observation(
        desired, ready, rolling_out, len(live), broken, unschedulable, loading, starting, paused
    )


def _model_name(endpoint: LLMEndpoint) -> str:
    model = endpoint.spec.model
    if model.pvc:
        return f"pvc {model.pvc.claim_name}/{model.pvc.sub_path}".rstrip("/")
    return model.repository or model.path or f"package {model.package}"


def assess(seen: Observation) -> tuple[Phase, dict[ConditionType, tuple[bool, str, str]]]:
    """Phase and each condition's (status, reason, message) from the observed facts."""
    ratio = f"{seen.ready}/{seen.desired} replicas ready"
    blocker = seen.resolving or seen.unschedulable or seen.loading or seen.starting
    broken = seen.refused or seen.broken
    if seen.refused:
        phase: Phase = "Failed"
        ready = (False, seen.refused.reason, seen.refused.message)
    elif seen.paused:
        phase = "Paused"
        ready = (
            (
                True,
                "Paused",
                "spec.paused is set: no replica runs and requests are refused until it is cleared",
            )
            if seen.desired == 0 and not seen.live_pods
            else (False, "Pausing", f"stopping {max(seen.desired, seen.live_pods)} replica(s)")
        )
    elif seen.desired == 0:
        phase = "ScaledToZero"
        ready = (True, "ScaledToZero", "no replica runs; the gateway starts one on the next request")
    elif seen.ready >= 1:
        phase = "Running"
        ready = (True, "Serving", ratio)
    elif seen.broken:
        phase = "Failed"
        ready = (False, seen.broken.reason, seen.broken.message)
    elif seen.resolving:
        phase = "Pending"
        ready = (False, seen.resolving.reason, seen.resolving.message)
    elif seen.unschedulable:
        phase = "Pending"
        ready = (False, seen.unschedulable.reason, seen.unschedulable.message)
    elif seen.loading:
        phase = "Loading"
        ready = (False, seen.loading.reason, seen.loading.message)
    elif seen.starting:
        phase = "Pending"
        ready = (False, seen.starting.reason, seen.starting.message)
    else:
        phase = "Pending"
        ready = (False, "Creating", "waiting for the serving pods to be created")

    if phase == "Failed" and broken:
        progressing = (False, broken.reason, broken.message)
    elif seen.resolving:
        progressing = (True, seen.resolving.reason, seen.resolving.message)
    elif seen.desired == 0 and seen.live_pods:
        progressing = (True, "ScalingDown", f"{seen.live_pods} pod(s) stopping")
    elif seen.ready < seen.desired or seen.rolling_out:
        finding = blocker or Finding("RollingOut", ratio)
        progressing = (True, finding.reason, finding.message)
    else:
        progressing = (False, "Stable", ratio)
    degraded = (True, broken.reason, broken.message) if broken else (False, "Healthy", "")
    scaled = (seen.desired == 0, "ScaledToZero" if seen.desired == 0 else "Scaled", ratio)
    return phase, {"Ready": ready, "Progressing": progressing, "ScaledToZero": scaled, "Degraded": degraded}


def compute_status(
    endpoint: LLMEndpoint,
    deployment: Manifest | None,
    pods: list[Manifest],
    events: list[Manifest],
    now: datetime,
    url: str,
    refused: Finding | None = None,
    resolving: Finding | None = None,
    loads: Mapping[str, LoadStatus] | None = None,
) -> LLMEndpointStatus:
    """The endpoint's whole status; a condition keeps its lastTransitionTime while its status holds.

    `refused`: why the operator renders nothing for the endpoint; it makes the endpoint Failed.
    `resolving`: why its revision is not resolved yet (the Hub could not be asked). `loads`: the `/status`
    of its loading pods, by name. `status.model` is the endpoint's (as recorded this pass)."""
    seen = replace(observe(endpoint, deployment, pods, events, loads), refused=refused, resolving=resolving)
    phase, verdicts = assess(seen)
    generation = endpoint.metadata.generation
    written = []
    for kind, (flag, reason, message) in verdicts.items():
        status: Literal["True", "False"] = "True" if flag else "False"
        previous = endpoint.status.condition(kind)
        since = previous.last_transition_time if previous and previous.status == status else now
        written.append(
            Condition(
                type=kind,
                status=status,
                observed_generation=generation,
                last_transition_time=since,
                reason=reason,
                message=message,
            )
        )
    return LLMEndpointStatus(
        phase=phase,
        url=url,
        replicas=seen.desired,
        ready_replicas=seen.ready,
        ready=f"{seen.ready}/{seen.desired}",
        observed_generation=generation,
        last_request_time=endpoint.status.last_request_time,
        api_key_hash=endpoint.status.api_key_hash,
        wake_requested_at=endpoint.status.wake_requested_at,
        wake_acknowledged=endpoint.status.wake_acknowledged,
        model=endpoint.status.model,
        adapters=adapters_shown(endpoint, loads or {}),
        conditions=written,
    )


def adapters_shown(endpoint: LLMEndpoint, loads: Mapping[str, LoadStatus]) -> list[str] | None:
    """`status.adapters`: what the replicas read this pass report loaded, else what was shown before; None
    for an endpoint without spec.adapters."""
    if not endpoint.spec.adapters:
        return None
    read = progress.loaded_adapters(list(loads.values()))
    return read if read is not None else endpoint.status.adapters


def status_patch(status: LLMEndpointStatus) -> Manifest:
    """The status as written by the operator: everything but lastRequestTime (the autoscaler's) and
    wakeRequestedAt (the gateway's), which the merge patch leaves as they are; apiKeyHash, model and adapters
    always, null when there are none, so what is no longer wanted is removed."""
    patch = status.model_dump(
        by_alias=True, exclude_none=True, mode="json", exclude={"last_request_time", "wake_requested_at"}
    )
    return {**patch, **{key: patch.get(key) for key in ("apiKeyHash", "model", "adapters")}}


def wake_due(status: LLMEndpointStatus) -> bool:
    """Whether a gateway asked for a wake (`wakeRequestedAt`) the operator has not acted on yet."""
    requested, acknowledged = status.wake_requested_at, status.wake_acknowledged
    return requested is not None and (acknowledged is None or requested > acknowledged)


def wake_requested(raw: Mapping[str, Any]) -> bool:
    """`wake_due` of a status as stored (False when it does not parse)."""
    try:
        return wake_due(LLMEndpointStatus.model_validate(raw))
    except pydantic.ValidationError:
        return False


@dataclass(frozen=True)
class Announcement:
    """A Kubernetes Event to post on the endpoint."""

    warning: bool
    reason: str
    message: str


WARNING_REASONS = frozenset(
    {"WaitingForGPU", "Unschedulable", "ProgressDeadlineExceeded", HUB_UNREACHABLE, *BROKEN_WAITING}
)


def announcement(previous: LLMEndpointStatus, current: LLMEndpointStatus) -> Announcement | None:
    """An Event when the phase or the reason it is (not) ready changes; None otherwise.

    The Event's reason is the new phase when the phase changed, else the new Ready reason."""
    before, after = previous.condition("Ready"), current.condition("Ready")
    if previous.phase == current.phase and (before and before.reason) == (after and after.reason):
        return None
    reason = after.reason if after else ""
    detail = f"{reason}: {after.message}".rstrip(": ") if after else ""
    return Announcement(
        warning=current.phase == "Failed" or reason in WARNING_REASONS,
        reason=str(current.phase) if previous.phase != current.phase else reason,
        message=f"phase {previous.phase or 'None'} -> {current.phase}. {detail}".strip(),
    )
