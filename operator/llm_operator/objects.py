"""Kubernetes objects as the API server sends and takes them: plain JSON mappings. Pure.

The one definition of their type, of an object's key, of a condition lookup and of the RFC 3339 time stamps
their fields carry; the operator, the autoscaler and the gateway import them from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

Manifest = dict[str, Any]
"""A Kubernetes object (or a part or patch of one) as JSON."""
Key = tuple[str, str]
"""A namespaced object's (namespace, name): how every part names an LLMEndpoint."""


def conditions(obj: Mapping[str, Any]) -> dict[str, Manifest]:
    """The object's `status.conditions` by type."""
    return {c.get("type", ""): c for c in (obj.get("status") or {}).get("conditions") or ()}


def condition_true(obj: Mapping[str, Any], kind: str) -> bool:
    """Whether the object's condition `kind` has status "True"."""
    return conditions(obj).get(kind, {}).get("status") == "True"


def rfc3339(moment: datetime) -> str:
    """`2026-01-01T12:00:00Z`: a Time field (whole seconds, UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_micro(moment: datetime) -> str:
    """`2026-01-01T12:00:00.000000Z`: a MicroTime field (a Lease's renewTime)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> datetime:
    """A Time or MicroTime field -> an aware datetime; ValueError when it is not one."""
    return datetime.fromisoformat(text)
