"""Builders of LLMEndpoints and child objects for the operator's unit tests."""

from __future__ import annotations

from typing import Any

from llm_operator.api.v1alpha1 import LLMEndpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
"""The commit the default endpoint's model is pinned to (nothing to resolve)."""


def endpoint(
    spec: dict[str, Any] | None = None,
    *,
    name: str = "falcon",
    status: dict[str, Any] | None = None,
    generation: int = 1,
    annotations: dict[str, str] | None = None,
) -> LLMEndpoint:
    """An LLMEndpoint as the API server would return it (spec merged over a small valid one)."""
    body = {
        "apiVersion": "llm-endpoints.io/v1alpha1",
        "kind": "LLMEndpoint",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": "uid-1",
            "generation": generation,
            "annotations": annotations or {},
        },
        "spec": {"model": {"repository": "tiiuae/falcon-40b-instruct", "revision": COMMIT}, **(spec or {})},
        "status": status or {},
    }
    return LLMEndpoint.model_validate(body)


def pod(
    name: str = "p1",
    *,
    phase: str = "Running",
    ready: bool = False,
    scheduled: str | None = None,
    message: str = "",
    waiting: str | None = None,
    waiting_message: str = "",
    terminated: dict[str, Any] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    """A serving pod in some state."""
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if scheduled:
        conditions.append(
            {"type": "PodScheduled", "status": "False", "reason": scheduled, "message": message}
        )
    container: dict[str, Any] = {"name": "server", "restartCount": 3, "state": {}, "lastState": {}}
    if waiting:
        container["state"] = {"waiting": {"reason": waiting, "message": waiting_message}}
    if terminated:
        container["lastState"] = {"terminated": terminated}
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "status": {"phase": phase, "conditions": conditions, "containerStatuses": [container]},
    }


def deployment(
    replicas: int = 1,
    ready: int = 0,
    *,
    updated: int | None = None,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A serving Deployment's spec.replicas and status."""
    return {
        "metadata": {"name": "falcon", "namespace": "ml", "generation": 1},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": 1,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas if updated is None else updated,
            "conditions": conditions or [],
        },
    }
