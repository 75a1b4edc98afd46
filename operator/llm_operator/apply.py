"""Writes of the operator: server-side apply of children under one field manager, and the few other
writes it needs (pruning, the generated API key, replica bounds, status, Events)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
from datetime import datetime

from llm_operator.api.v1alpha1 import API_VERSION, KIND, LLMEndpoint, LLMEndpointStatus, ModelStatus
from llm_operator.contract import AUTOSCALER_FIELD_MANAGER, FIELD_MANAGER, OPERATOR, default_api_key_secret
from llm_operator.kube import ConflictError, Kube, NotFoundError
from llm_operator.objects import Manifest, rfc3339
from llm_operator.render import OPTIONAL_CHILDREN, labels, owner_reference
from llm_operator.status import status_patch

log = logging.getLogger("llm_operator.apply")


async def apply_children(kube: Kube, manifests: list[Manifest]) -> dict[str, Manifest]:
    """Apply every rendered child at once; the API server's answers by kind."""
    answers = await asyncio.gather(*(kube.apply(body, FIELD_MANAGER) for body in manifests))
    return {str(body["kind"]): answer for body, answer in zip(manifests, answers, strict=True)}


async def prune(kube: Kube, endpoint: LLMEndpoint, rendered: list[Manifest]) -> list[str]:
    """Delete optional children the spec no longer asks for (only ones this endpoint controls)."""
    wanted = {(body["apiVersion"], body["kind"], body["metadata"]["name"]) for body in rendered}
    deleted = []
    for (api_version, kind), pattern in OPTIONAL_CHILDREN.items():
        name = pattern.format(name=endpoint.metadata.name)
        if (api_version, kind, name) in wanted:
            continue
        try:
            current = await kube.get(api_version, kind, endpoint.metadata.namespace, name)
        except NotFoundError:
            continue
        owners = current["metadata"].get("ownerReferences") or ()
        if any(ref.get("uid") == endpoint.metadata.uid and ref.get("controller") for ref in owners):
            try:
                await kube.delete(
                    api_version, kind, endpoint.metadata.namespace, name, uid=current["metadata"]["uid"]
                )
            except (NotFoundError, ConflictError):
                continue
            deleted.append(f"{kind}/{name}")
    return deleted


async def ensure_api_key(kube: Kube, endpoint: LLMEndpoint) -> Manifest | None:
    """The `<name>-api-key` Secret of a protected endpoint that names none, created with a random token when
    missing; None for an endpoint that uses no such Secret.

    Create-only: an existing Secret (rotated by a person) is never touched, and it is returned as found, so
    the caller decides with `policy.owned_key_secret` whether it is the endpoint's own."""
    if endpoint.spec.access != "protected" or endpoint.spec.api_key_secret_ref is not None:
        return None
    name = default_api_key_secret(endpoint)
    with contextlib.suppress(NotFoundError):
        return await kube.get("v1", "Secret", endpoint.metadata.namespace, name)
    token = secrets.token_urlsafe(32)
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": endpoint.metadata.namespace,
            "labels": labels(endpoint),
            "ownerReferences": [owner_reference(endpoint)],
        },
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }
    try:
        created = await kube.create(body, FIELD_MANAGER)
    except ConflictError:  # created between the read and the create: read what is there
        return await kube.get("v1", "Secret", endpoint.metadata.namespace, name)
    ref = {"namespace": endpoint.metadata.namespace, "endpoint": endpoint.metadata.name}
    log.info("created the endpoint's API key Secret", extra=ref)
    return created


async def set_replicas(kube: Kube, deployment: Manifest, replicas: int) -> None:
    """Set a Deployment's replicas as the autoscaler's field manager (the operator's own apply omits them),
    on the Deployment itself (not its scale): the chart's admission policy checks the Deployment's labels."""
    meta = deployment["metadata"]
    await kube.merge_patch(
        "apps/v1",
        "Deployment",
        meta["namespace"],
        meta["name"],
        {"spec": {"replicas": replicas}},
        field_manager=AUTOSCALER_FIELD_MANAGER,
    )


async def write_status(
    kube: Kube, endpoint: LLMEndpoint, resource_version: str, status: LLMEndpointStatus
) -> None:
    """One merge patch of the status subresource, refused (409) if the endpoint changed since it was read."""
    await _patch_status(kube, endpoint, resource_version, status_patch(status))


async def write_model(
    kube: Kube, endpoint: LLMEndpoint, resource_version: str, model: ModelStatus | None
) -> str:
    """Record the resolved revision (`status.model`) before anything is rendered with it; refused (409) if
    the endpoint changed since it was read. The endpoint's new resourceVersion."""
    value = model.model_dump(by_alias=True, exclude_none=True, mode="json") if model else None
    answer = await _patch_status(kube, endpoint, resource_version, {"model": value})
    return str(answer["metadata"]["resourceVersion"])


async def _patch_status(
    kube: Kube, endpoint: LLMEndpoint, resource_version: str, status: Manifest
) -> Manifest:
    """Merge `status` into the status subresource, refused (409) if the endpoint changed since it was read."""
    patch = {"metadata": {"resourceVersion": resource_version}, "status": status}
    return await kube.merge_patch(
        API_VERSION,
        KIND,
        endpoint.metadata.namespace,
        endpoint.metadata.name,
        patch,
        subresource="status",
        field_manager=FIELD_MANAGER,
    )


async def post_event(
    kube: Kube,
    endpoint: LLMEndpoint,
    *,
    warning: bool,
    reason: str,
    message: str,
    now: datetime,
    instance: str,
) -> None:
    """A core/v1 Event on the endpoint, shown by `kubectl describe llme`."""
    stamp = rfc3339(now)
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{endpoint.metadata.name}.", "namespace": endpoint.metadata.namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": endpoint.metadata.name,
            "namespace": endpoint.metadata.namespace,
            "uid": endpoint.metadata.uid,
        },
        "type": "Warning" if warning else "Normal",
        "reason": reason,
        "message": message[:1024],
        "source": {"component": OPERATOR},
        "reportingComponent": f"llm-endpoints.io/{OPERATOR}",
        "reportingInstance": instance[:128],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    await kube.create(body)
