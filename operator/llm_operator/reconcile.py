"""One level-triggered pass for one endpoint: read -> render -> apply -> status (written once, if changed).

Idempotent: applying unchanged objects is a no-op on the server, and an unchanged status is not written, so
running it twice in a row changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pydantic

from llm_operator import apply, metrics
from llm_operator.api.v1alpha1 import API_VERSION, KIND, LLMEndpoint, LLMEndpointStatus
from llm_operator.errors import InvalidEndpointError, NotFoundError
from llm_operator.kube import Kube
from llm_operator.render import render, replica_correction, selector
from llm_operator.settings import Settings
from llm_operator.status import announcement, compute_status

Manifest = dict[str, Any]
log = logging.getLogger("llm_operator.reconcile")


@dataclass(frozen=True)
class Outcome:
    """What one pass did."""

    status: LLMEndpointStatus | None
    """The computed status; None when the endpoint is gone or being deleted."""
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
    *,
    children: bool = True,
) -> Outcome:
    """Bring the children of `namespace/name` to what its spec says and its status to what they show.

    With children=False (a pod or a Deployment's status moved, nothing the operator owns) the children are
    only read, not applied, unless the spec changed or the Deployment is missing."""
    try:
        body = await kube.get(API_VERSION, KIND, namespace, name)
    except NotFoundError:
        metrics.forget(namespace, name)
        return Outcome(status=None)
    if body["metadata"].get("deletionTimestamp"):
        metrics.forget(namespace, name)
        return Outcome(status=None)  # owner references let the garbage collector delete the children
    endpoint = parse(body)
    spec_changed = endpoint.status.observed_generation != endpoint.metadata.generation

    deployment = None
    if not children and not spec_changed:
        with contextlib.suppress(NotFoundError):
            deployment = await kube.get("apps/v1", "Deployment", namespace, name)
    pruned: list[str] = []
    if deployment is None:
        rendered = render(endpoint, settings)
        deployment = (await apply.apply_children(kube, rendered))["Deployment"]
        if spec_changed:
            if endpoint.metadata.generation > 1:  # a first spec has nothing to prune
                pruned = await apply.prune(kube, endpoint, rendered)
            if await apply.ensure_api_key(kube, endpoint):
                log.info("created the endpoint's API key Secret", extra=_ref(endpoint))

    scaled_to = replica_correction(deployment.get("spec", {}).get("replicas"), endpoint)
    if scaled_to is not None:
        deployment = await apply.set_replicas(kube, deployment, scaled_to)

    # a Deployment the controller has not yet seen (no status) has no pods: skip the read
    pods = []
    if deployment.get("status"):
        pods = await kube.list("v1", "Pod", namespace, labels=selector(endpoint))
    events = await _scheduling_events(kube, namespace, pods)
    status = compute_status(endpoint, deployment, pods, events, now(), settings.url(namespace, name))
    metrics.record(endpoint, status)

    written = False
    if apply.status_patch(status) != apply.status_patch(endpoint.status):
        await apply.write_status(kube, endpoint, body["metadata"]["resourceVersion"], status)
        written = True
    if news := announcement(endpoint.status, status):
        log.info(news.message, extra={**_ref(endpoint), "phase": status.phase, "reason": news.reason})
        await apply.post_event(
            kube,
            endpoint,
            warning=news.warning,
            reason=news.reason,
            message=news.message,
            now=now(),
            instance=instance,
        )
    return Outcome(status, written, tuple(pruned), scaled_to)


async def _scheduling_events(kube: Kube, namespace: str, pods: list[Manifest]) -> list[Manifest]:
    """FailedScheduling events of the pods the scheduler could not place (read only when there are some)."""
    events: list[Manifest] = []
    for pod in pods:
        scheduled: Manifest = next(
            (c for c in pod.get("status", {}).get("conditions") or () if c.get("type") == "PodScheduled"), {}
        )
        if scheduled.get("reason") == "Unschedulable":
            fields = {"involvedObject.name": pod["metadata"]["name"], "reason": "FailedScheduling"}
            events += await kube.list("v1", "Event", namespace, fields=fields)
            break  # one pod's events say it for all: they share a template
    return events


def _ref(endpoint: LLMEndpoint) -> dict[str, str]:
    return {"namespace": endpoint.metadata.namespace, "endpoint": endpoint.metadata.name}
