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

from llm_operator import apply, metrics, policy
from llm_operator.api.v1alpha1 import API_VERSION, KIND, LLMEndpoint, LLMEndpointStatus
from llm_operator.apikey import published_key
from llm_operator.errors import InvalidEndpointError, NotFoundError
from llm_operator.kube import Kube
from llm_operator.render import render, replica_correction, selector
from llm_operator.settings import Settings
from llm_operator.status import announcement, compute_status, wake_due

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

    # a refused endpoint (policy.py) gets nothing applied; what an earlier spec made stays as it is
    refused = policy.image_refusal(endpoint, settings)
    key_secret = None if refused else await apply.ensure_api_key(kube, endpoint)
    if key_secret is not None:
        refused = policy.key_secret_refusal(key_secret, endpoint)
    elif (named := endpoint.spec.api_key_secret_ref) is not None and not refused:
        key_secret = await _named_key_secret(kube, endpoint, named.name)
    key_hash = published_key(endpoint, key_secret)  # read on every pass: a rotated key reaches the gateway
    waking = wake_due(endpoint.status)

    deployment = None
    if refused or (not children and not spec_changed):
        with contextlib.suppress(NotFoundError):
            deployment = await kube.get("apps/v1", "Deployment", namespace, name)
    pruned: list[str] = []
    if deployment is None and not refused:
        # the pod template follows the key read this pass, so a rotated key rolls the pods
        current_key = endpoint.model_copy(
            update={"status": endpoint.status.model_copy(update={"api_key_hash": key_hash})}
        )
        rendered = render(current_key, settings)
        deployment = (await apply.apply_children(kube, rendered))["Deployment"]
        if spec_changed and endpoint.metadata.generation > 1:  # a first spec has nothing to prune
            pruned = await apply.prune(kube, endpoint, rendered)

    scaled_to = None
    pods = []
    if deployment is not None:
        current = deployment.get("spec", {}).get("replicas")
        scaled_to = replica_correction(current, endpoint)
        if waking and scaled_to is None and current == 0 and not (refused or endpoint.spec.paused):
            scaled_to = 1  # a gateway holds a request: one replica at once, then the autoscaler decides
        if scaled_to is not None:
            deployment = await apply.set_replicas(kube, deployment, scaled_to)
        # a Deployment the controller has not yet seen (no status) has no pods: skip the read
        if deployment.get("status"):
            pods = await kube.list("v1", "Pod", namespace, labels=selector(endpoint))
    events = await _scheduling_events(kube, namespace, pods)
    url = settings.url(namespace, name)
    status = compute_status(endpoint, deployment, pods, events, now(), url, refused)
    acknowledged = endpoint.status.wake_requested_at if waking else endpoint.status.wake_acknowledged
    status = status.model_copy(update={"api_key_hash": key_hash, "wake_acknowledged": acknowledged})
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


async def _named_key_secret(kube: Kube, endpoint: LLMEndpoint, name: str) -> Manifest | None:
    """The Secret spec.apiKeySecretRef names; None (every request refused) while it does not exist."""
    try:
        return await kube.get("v1", "Secret", endpoint.metadata.namespace, name)
    except NotFoundError:
        log.warning("API key Secret %s not found: every request is refused", name, extra=_ref(endpoint))
        return None


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
