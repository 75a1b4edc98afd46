"""One level-triggered pass for one endpoint: read -> render -> apply -> status (written once, if changed).

Idempotent: applying unchanged objects is a no-op on the server, and an unchanged status is not written, so
running it twice in a row changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pydantic

from llm_operator import apply
from llm_operator.api.v1alpha1 import API_VERSION, KIND, LLMEndpoint, LLMEndpointStatus, Phase
from llm_operator.errors import InvalidEndpointError, NotFoundError
from llm_operator.kube import Kube
from llm_operator.render import render, replica_correction, selector
from llm_operator.settings import Settings
from llm_operator.status import compute_status

Manifest = dict[str, Any]
log = logging.getLogger("llm_operator.reconcile")


@dataclass(frozen=True)
class Outcome:
    """What one pass did."""

    status: LLMEndpointStatus | None
    """The computed status; None when the endpoint is gone or being deleted."""
    previous_phase: Phase | None = None
    status_written: bool = False
    pruned: tuple[str, ...] = ()
    scaled_to: int | None = None


def parse(body: Manifest) -> LLMEndpoint:
    """A stored object -> the model, or InvalidEndpointError naming what is wrong."""
    try:
        return LLMEndpoint.model_validate(body)
    except pydantic.ValidationError as error:
        raise InvalidEndpointError(f"stored LLMEndpoint does not parse: {error}") from error


async def reconcile(
    kube: Kube,
    namespace: str,
    name: str,
    settings: Settings,
    now: Callable[[], datetime],
    instance: str = "llm-operator",
) -> Outcome:
    """Bring the children of `namespace/name` to what its spec says and its status to what they show."""
    try:
        body = await kube.get(API_VERSION, KIND, namespace, name)
    except NotFoundError:
        return Outcome(status=None)
    if body["metadata"].get("deletionTimestamp"):
        return Outcome(status=None)  # owner references let the garbage collector delete the children
    endpoint = parse(body)
    spec_changed = endpoint.status.observed_generation != endpoint.metadata.generation

    rendered = render(endpoint, settings)
    applied = await apply.apply_children(kube, rendered)
    pruned: list[str] = []
    if spec_changed:
        pruned = await apply.prune(kube, endpoint, rendered)
        if await apply.ensure_api_key(kube, endpoint):
            log.info("created the endpoint's API key Secret", extra=_ref(endpoint))

    deployment = applied["Deployment"]
    scaled_to = replica_correction(deployment.get("spec", {}).get("replicas"), endpoint)
    if scaled_to is not None:
        deployment = await apply.set_replicas(kube, deployment, scaled_to)

    pods = await kube.list("v1", "Pod", namespace, labels=selector(endpoint))
    events = await _scheduling_events(kube, namespace, pods)
    status = compute_status(endpoint, deployment, pods, events, now(), settings.url(namespace, name))

    written = False
    if apply.status_patch(status) != apply.status_patch(endpoint.status):
        await apply.write_status(kube, endpoint, body["metadata"]["resourceVersion"], status)
        written = True
    previous = endpoint.status.phase
    if status.phase != previous:
        await _announce(kube, endpoint, previous, status, now(), instance)
    return Outcome(status, previous, written, tuple(pruned), scaled_to)


async def _scheduling_events(kube: Kube, namespace: str, pods: list[Manifest]) -> list[Manifest]:
    """FailedScheduling events of the pods the scheduler could not place (read only when there are some)."""
    events: list[Manifest] = []
    for pod in pods:
        scheduled = next(
            (c for c in pod.get("status", {}).get("conditions") or () if c.get("type") == "PodScheduled"), {}
        )
        if scheduled.get("reason") == "Unschedulable":
            fields = {"involvedObject.name": pod["metadata"]["name"], "reason": "FailedScheduling"}
            events += await kube.list("v1", "Event", namespace, fields=fields)
            break  # one pod's events say it for all: they share a template
    return events


async def _announce(
    kube: Kube,
    endpoint: LLMEndpoint,
    previous: Phase | None,
    status: LLMEndpointStatus,
    now: datetime,
    instance: str,
) -> None:
    ready = status.condition("Ready")
    detail = f"{ready.reason}: {ready.message}" if ready else ""
    message = f"phase {previous or 'None'} -> {status.phase}. {detail}".strip()
    warning = status.phase == "Failed" or (ready is not None and ready.reason == "WaitingForGPU")
    log.info(message, extra={**_ref(endpoint), "phase": status.phase, "previous_phase": previous})
    await apply.post_event(
        kube, endpoint, warning=warning, reason=str(status.phase), message=message, now=now, instance=instance
    )


def _ref(endpoint: LLMEndpoint) -> dict[str, str]:
    return {"namespace": endpoint.metadata.namespace, "name": endpoint.metadata.name}
