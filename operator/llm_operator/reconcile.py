"""One level-triggered pass for one endpoint: read -> resolve -> plan -> apply -> status (written once, if
changed).

What the pass writes is decided in `plan.py` from what it read; this module does the reads and the writes.
A Hub revision to resolve (`revision.resolution_needed`) is asked of the Hub first and its commit recorded
in `status.model` before anything is rendered with it; the loading pods' `/status` is read for the status.
Idempotent: applying unchanged objects is a no-op on the server, and an unchanged status is not written, so
running it twice in a row changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import aiohttp

from llm_operator import apply, hub, loadprobe, metrics, progress, revision
from llm_operator.api.v1alpha1 import API_VERSION, KIND, LLMEndpoint, LLMEndpointStatus, parse_endpoint
from llm_operator.kube import Kube, NotFoundError
from llm_operator.objects import Manifest
from llm_operator.plan import (
    hub_findings,
    plan_apply,
    plan_update,
    reads_key_secret,
    reads_pods,
    unschedulable_pod,
)
from llm_operator.render import selector
from llm_operator.settings import Settings

log = logging.getLogger("llm_operator.reconcile")


@dataclass(frozen=True)
class Outcome:
    """What one pass did."""

    status: LLMEndpointStatus | None
    """The computed status; None when the endpoint is gone or being deleted."""
    status_written: bool = False
    pruned: tuple[str, ...] = ()
    scaled_to: int | None = None
    hub_retry: bool = False
    """The revision could not be resolved (refused or unreachable): try again after a back-off."""
    requeue_after: float | None = None
    """A replica is loading: look again this soon (its progress)."""


async def reconcile(
    kube: Kube,
    namespace: str,
    name: str,
    settings: Settings,
    now: Callable[[], datetime],
    instance: str = "llm-operator",
    *,
    children: bool = True,
    http: aiohttp.ClientSession | None = None,
) -> Outcome:
    """Bring the children of `namespace/name` to what its spec says and its status to what they show.

    With children=False (a pod or a Deployment's status moved, nothing the operator owns) the children are
    only read, not applied, unless the spec changed or the Deployment is missing. `http`: the session for
    the Hub and the pods' `/status` (one of its own when None)."""
    if http is None:
        async with aiohttp.ClientSession() as own:
            return await reconcile(
                kube, namespace, name, settings, now, instance, children=children, http=own
            )
    try:
        body = await kube.get(API_VERSION, KIND, namespace, name)
    except NotFoundError:
        metrics.forget(namespace, name)
        return Outcome(status=None)
    if body["metadata"].get("deletionTimestamp"):
        metrics.forget(namespace, name)
        return Outcome(status=None)  # owner references let the garbage collector delete the children
    endpoint = parse_endpoint(body)
    version = str(body["metadata"]["resourceVersion"])

    allowed = reads_key_secret(endpoint, settings)
    wanted = revision.resolution_needed(endpoint) if allowed else None
    answer = None
    if wanted is not None:
        token = await hub.read_token(kube, namespace, wanted)
        answer = await hub.resolve(http, settings.hub_url, wanted, token)
    if (model := revision.recorded_model(endpoint, answer)) != endpoint.status.model:
        version = await apply.write_model(kube, endpoint, version, model)
    endpoint = revision.with_model(endpoint, model)
    findings = hub_findings(wanted, answer, settings.hub_url)

    key_secret = await _key_secret(kube, endpoint) if allowed else None
    children_plan = plan_apply(endpoint, settings, key_secret, children=children, hub=findings)
    deployment = None
    if children_plan.read_first:
        with contextlib.suppress(NotFoundError):
            deployment = await kube.get("apps/v1", "Deployment", namespace, name)
    pruned: list[str] = []
    if deployment is None and children_plan.rendered:
        rendered = list(children_plan.rendered)
        deployment = (await apply.apply_children(kube, rendered))["Deployment"]
        if children_plan.prune:
            pruned = await apply.prune(kube, endpoint, rendered)

    pods = (
        await kube.list("v1", "Pod", namespace, labels=selector(endpoint)) if reads_pods(deployment) else []
    )
    events: list[Manifest] = []
    if (unschedulable := unschedulable_pod(pods)) is not None:
        fields = {"involvedObject.name": unschedulable, "reason": "FailedScheduling"}
        events = await kube.list("v1", "Event", namespace, fields=fields)
    ready_too = progress.adapters_unconfirmed(endpoint)
    loads = await loadprobe.read_loading(http, pods, settings.port, ready_too=ready_too)
    update = plan_update(endpoint, children_plan, deployment, pods, events, now(), settings, loads)

    if deployment is not None and update.scale_to is not None:
        await apply.set_replicas(kube, deployment, update.scale_to)
    metrics.record(endpoint, update.status)
    metrics.record_progress(endpoint, progress.least_advanced(list(loads.values())))
    if update.write_status:
        await apply.write_status(kube, endpoint, version, update.status)
    if (news := update.announcement) is not None:
        log.info(news.message, extra={**_ref(endpoint), "phase": update.status.phase, "reason": news.reason})
        await apply.post_event(
            kube,
            endpoint,
            warning=news.warning,
            reason=news.reason,
            message=news.message,
            now=now(),
            instance=instance,
        )
    return Outcome(
        update.status,
        update.write_status,
        tuple(pruned),
        update.scale_to,
        hub_retry=findings != (None, None),
        requeue_after=progress.LOADING_REQUEUE_SECONDS if loadprobe.loading_pods(pods) else None,
    )


async def _key_secret(kube: Kube, endpoint: LLMEndpoint) -> Manifest | None:
    """The default key Secret (created when missing), or the one spec.apiKeySecretRef names."""
    if (default := await apply.ensure_api_key(kube, endpoint)) is not None:
        return default
    if (named := endpoint.spec.api_key_secret_ref) is not None:
        return await _named_key_secret(kube, endpoint, named.name)
    return None


async def _named_key_secret(kube: Kube, endpoint: LLMEndpoint, name: str) -> Manifest | None:
    """The Secret spec.apiKeySecretRef names; None (every request refused) while it does not exist."""
    try:
        return await kube.get("v1", "Secret", endpoint.metadata.namespace, name)
    except NotFoundError:
        log.warning("API key Secret %s not found: every request is refused", name, extra=_ref(endpoint))
        return None


def _ref(endpoint: LLMEndpoint) -> dict[str, str]:
    return {"namespace": endpoint.metadata.namespace, "endpoint": endpoint.metadata.name}
