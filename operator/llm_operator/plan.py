"""What one reconcile pass writes, decided from what it has read. Pure; `reconcile.py` reads and executes.

A pass decides twice, because the second decision reads what the first one's writes answer:
1. `plan_apply`, from the endpoint (with the revision resolved this pass recorded), its key Secret and the
   Hub's answer: whether the endpoint is refused (then nothing is applied), the children to apply or whether
   the Deployment is only read (also while its revision has no commit), whether to prune, the key hash.
2. `plan_update`, from the Deployment (as applied, or as read), its pods and their scheduling events: the
   replicas to set, the status, whether it changed (and is written), the Event to post.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from llm_contract import LoadStatus
from llm_operator import policy, revision
from llm_operator.api.v1alpha1 import LLMEndpoint, LLMEndpointStatus
from llm_operator.apikey import published_key
from llm_operator.objects import Manifest, conditions
from llm_operator.render import render, replica_correction
from llm_operator.settings import Settings
from llm_operator.status import Announcement, Finding, announcement, compute_status, status_patch, wake_due


def hub_findings(
    resolution: revision.Resolution | None, answer: revision.HubAnswer | None, hub_url: str
) -> tuple[Finding | None, Finding | None]:
    """(refused, resolving) from the Hub's answer: a refusal makes the endpoint Failed with the Hub's reason
    and message; an outage shows as HubUnreachable while it is retried."""
    if resolution is None or answer is None or isinstance(answer, revision.Resolved):
        return None, None
    message = revision.hub_message(resolution, answer, hub_url)
    if isinstance(answer, revision.Refused):
        return Finding(answer.reason, message), None
    return None, Finding(revision.HUB_UNREACHABLE, message)


def reads_key_secret(endpoint: LLMEndpoint, settings: Settings) -> bool:
    """Whether the pass reads the endpoint's key Secret (creating the default one when missing): not for an
    endpoint the image policy refuses, which gets nothing created."""
    return policy.image_refusal(endpoint, settings) is None


@dataclass(frozen=True)
class ApplyPlan:
    """What a pass does to the endpoint's children."""

    refused: Finding | None
    """Why nothing is applied (the image policy, or a default key Secret the endpoint does not own); what an
    earlier spec made stays as it is."""
    key_hash: str | None
    """The API key hash to publish (read on every pass: a rotated key reaches the gateway)."""
    rendered: tuple[Manifest, ...]
    """The children to apply, with a pod template that follows the key read this pass (a rotated key rolls the
    pods); empty when refused."""
    read_first: bool
    """Read the Deployment, and apply `rendered` only when it is missing: the pass was started by a pod or a
    Deployment's status (nothing the operator owns) and the spec is unchanged, or the endpoint is refused."""
    prune: bool
    """After applying, delete the optional children the spec no longer asks for (a first spec has none)."""
    resolving: Finding | None = None
    """Why the model's revision has no commit yet, while the Hub cannot be asked."""


def plan_apply(
    endpoint: LLMEndpoint,
    settings: Settings,
    key_secret: Manifest | None,
    *,
    children: bool,
    hub: tuple[Finding | None, Finding | None] = (None, None),
) -> ApplyPlan:
    """`key_secret`: the default Secret as read or created, or the one `spec.apiKeySecretRef` names (None when
    there is none, or it was not read: see `reads_key_secret`); `hub`: `hub_findings` of this pass."""
    hub_refused, resolving = hub
    refused = policy.image_refusal(endpoint, settings) or hub_refused
    if refused is None and key_secret is not None and endpoint.spec.api_key_secret_ref is None:
        refused = policy.key_secret_refusal(key_secret, endpoint)
    key_hash = published_key(endpoint, key_secret)
    spec_changed = endpoint.status.observed_generation != endpoint.metadata.generation
    unpinned = revision.unpinned(endpoint)
    rendered: tuple[Manifest, ...] = ()
    if refused is None and not unpinned:
        current_key = endpoint.model_copy(
            update={"status": endpoint.status.model_copy(update={"api_key_hash": key_hash})}
        )
        rendered = tuple(render(current_key, settings))
    return ApplyPlan(
        refused=refused,
        key_hash=key_hash,
        rendered=rendered,
        read_first=refused is not None or unpinned or (not children and not spec_changed),
        prune=spec_changed and endpoint.metadata.generation > 1,
        resolving=resolving,
    )


def reads_pods(deployment: Manifest | None) -> bool:
    """A Deployment the controller has not yet seen (no status) has no pods: the pass skips the read."""
    return deployment is not None and bool(deployment.get("status"))


def unschedulable_pod(pods: Sequence[Manifest]) -> str | None:
    """A pod the scheduler could not place, whose FailedScheduling events the pass reads (one pod's events say
    it for all: they share a template); None when every pod is placed."""
    return next(
        (
            pod["metadata"]["name"]
            for pod in pods
            if conditions(pod).get("PodScheduled", {}).get("reason") == "Unschedulable"
        ),
        None,
    )


@dataclass(frozen=True)
class UpdatePlan:
    """What a pass writes once its children are as the spec says."""

    scale_to: int | None
    """The replicas to set on the Deployment (outside the spec's bounds, or a wake from zero); None: leave
    them to the autoscaler."""
    status: LLMEndpointStatus
    write_status: bool
    """Whether the status differs from the stored one in what the operator writes."""
    announcement: Announcement | None
    """The Event to post: the phase or the Ready reason changed."""


def with_replicas(deployment: Manifest, replicas: int) -> Manifest:
    """The Deployment as it is once its replicas are set."""
    return {**deployment, "spec": {**deployment.get("spec", {}), "replicas": replicas}}


def plan_update(
    endpoint: LLMEndpoint,
    applied: ApplyPlan,
    deployment: Manifest | None,
    pods: list[Manifest],
    events: list[Manifest],
    now: datetime,
    settings: Settings,
    loads: Mapping[str, LoadStatus] | None = None,
) -> UpdatePlan:
    """`deployment`: as applied or read (None when missing and refused); `events`: the FailedScheduling ones
    of `unschedulable_pod`; `loads`: the `/status` of the loading pods, by name."""
    waking = wake_due(endpoint.status)
    scale_to = None
    if deployment is not None:
        current = deployment.get("spec", {}).get("replicas")
        scale_to = replica_correction(current, endpoint)
        refused = applied.refused is not None or endpoint.spec.paused
        if waking and scale_to is None and current == 0 and not refused:
            scale_to = 1  # a gateway holds a request: one replica at once, then the autoscaler decides
        if scale_to is not None:
            deployment = with_replicas(deployment, scale_to)
    meta = endpoint.metadata
    url = settings.url(meta.namespace, meta.name)
    status = compute_status(
        endpoint, deployment, pods, events, now, url, applied.refused, applied.resolving, loads
    )
    acknowledged = endpoint.status.wake_requested_at if waking else endpoint.status.wake_acknowledged
    status = status.model_copy(update={"api_key_hash": applied.key_hash, "wake_acknowledged": acknowledged})
    return UpdatePlan(
        scale_to=scale_to,
        status=status,
        write_status=status_patch(status) != status_patch(endpoint.status),
        announcement=announcement(endpoint.status, status),
    )
