"""kopf wiring: watch LLMEndpoints and their children, and turn every event into a queued key.

Only `on.event` handlers are used: they keep no state on the objects (no finalizers, no progress
annotations), so the operator never writes to what the user owns. All decisions happen in the controller's
level-triggered reconcile.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from llm_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from llm_operator.contract import AUTOSCALER_FIELD_MANAGER, ENDPOINT_LABEL, FIELD_MANAGER, MANAGED_BY
from llm_operator.controller import Controller
from llm_operator.kube import Credentials
from llm_operator.revision import resolve_requested
from llm_operator.status import wake_requested

CHILDREN = (
    ("apps", "v1", "deployments"),
    ("v1", "pods"),
    ("v1", "services"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
    ("v1", "persistentvolumeclaims"),
)
"""Resources whose events re-trigger their endpoint (pods carry the endpoint label through the template)."""


def only_ours(event_type: str | None, meta: Mapping[str, Any]) -> bool:
    """Whether a child's event shows nothing but the operator's own apply: no other writer, not deleted.

    Such an event (the echo of the operator's own write) cannot change what reconcile would do."""
    managers = {entry.get("manager") for entry in meta.get("managedFields") or ()}
    return event_type in ("ADDED", "MODIFIED") and managers == {FIELD_MANAGER}


def may_have_drifted(event_type: str | None, kind: str, meta: Mapping[str, Any]) -> bool:
    """Whether a child's event may show a change to what the operator applies (so the next pass applies).

    Pods are not applied; other writers' status and scale writes (controllers) and the autoscaler's replicas
    change nothing the operator owns. Deletions, first listings and any other writer's edits may."""
    if kind == "Pod":
        return False
    if event_type not in ("ADDED", "MODIFIED"):
        return True
    return any(
        entry.get("manager") not in (FIELD_MANAGER, AUTOSCALER_FIELD_MANAGER)
        and entry.get("subresource") not in ("status", "scale")
        for entry in meta.get("managedFields") or ()
    )


def build_registry(controller: Controller, credentials: Credentials) -> kopf.OperatorRegistry:
    """A kopf registry with the operator's handlers bound to `controller`."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # Events are posted by reconcile, on phase changes only
        # The chart grants no reads of CRDs or Namespaces (least privilege): without this, kopf retries
        # those scans for about a minute of 403s before it falls back to what it found at start anyway.
        settings.scanning.disabled = True
        settings.watching.server_timeout = 600
        settings.watching.client_timeout = 630
        settings.networking.connect_timeout = 10
        settings.networking.request_timeout = 60
        managed = ",".join(f"{key}={value}" for key, value in MANAGED_BY.items())
        for resource in CHILDREN:  # filter children on the server: a cluster's other pods never reach us
            settings.watching.label_selectors[resource[-1]] = managed

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=credentials.server,
            ca_path=credentials.ca_path,
            insecure=credentials.insecure,
            certificate_path=credentials.cert_path,
            private_key_path=credentials.key_path,
            token=credentials.bearer(),
        )

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def endpoint_event(
        type: str, name: str, namespace: str | None, meta: kopf.Meta, status: kopf.Status, **_: Any
    ) -> None:
        # a MODIFIED event of an already observed generation is a status or metadata write (the
        # operator's own, or the autoscaler's): the endpoint is known, but there is nothing to reconcile,
        # unless a gateway asks for a wake or a person for the revision to be resolved again
        observed = type == "MODIFIED" and meta.get("generation") == status.get("observedGeneration")
        observed = observed and not resolve_requested(meta.get("annotations") or {}, status)
        controller.endpoint_seen(
            namespace or "default",
            name,
            deleted=type == "DELETED",
            reconcile=not observed,
            wake=wake_requested(status),
        )

    def child_event(
        type: str,
        resource: kopf.Resource,
        labels: kopf.Labels,
        meta: kopf.Meta,
        namespace: str | None,
        **_: Any,
    ) -> None:
        if namespace and (endpoint := labels.get(ENDPOINT_LABEL)) and not only_ours(type, meta):
            drifted = may_have_drifted(type, resource.kind or "", meta)
            controller.child_seen(namespace, endpoint, drifted=drifted)

    for resource in CHILDREN:
        kopf.on.event(*resource, labels=dict(MANAGED_BY), registry=registry, id=f"child-{resource[-1]}")(
            child_event
        )
    logging.getLogger(__name__).debug("registered %d child watches", len(CHILDREN))
    return registry
