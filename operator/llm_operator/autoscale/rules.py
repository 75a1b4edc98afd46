"""The autoscaler's decisions besides the replica count (`decide.py`): which gateway pods to scrape, where an
endpoint's idleness starts counting, when `status.lastRequestTime` is rewritten. Pure."""

from __future__ import annotations

from collections.abc import Iterable

from llm_operator.objects import Manifest, condition_true, conditions, parse_rfc3339


def gateway_metrics_urls(pods: Iterable[Manifest], port: int) -> list[str]:
    """The metrics URLs of the ready pods with an IP (a pod still starting or being replaced is skipped)."""
    return [
        f"http://{pod['status']['podIP']}:{port}/metrics"
        for pod in pods
        if (pod.get("status") or {}).get("podIP") and condition_true(pod, "Ready")
    ]


def _unix(text: str | None) -> float | None:
    return parse_rfc3339(text).timestamp() if text else None


def idle_since(deployment: Manifest, current: int, now: float, started: float) -> float:
    """Where idleness starts counting: not before the replicas became available (a replica still loading its
    model has had no chance to serve), nor before creation or the autoscaler's start (`started`)."""
    status = deployment.get("status") or {}
    if current > 0 and not status.get("readyReplicas"):
        return now
    available = conditions(deployment).get("Available", {})
    became = available.get("lastTransitionTime") if available.get("status") == "True" else None
    moments = (deployment["metadata"].get("creationTimestamp"), became)
    return max([started, *(t for t in map(_unix, moments) if t is not None)])


def latest(*moments: float | None) -> float | None:
    """The latest of the known moments; None when none is known."""
    return max((t for t in moments if t is not None), default=None)


def last_request_due(seen: float, written: float | None, every: float) -> bool:
    """Whether `status.lastRequestTime` (`written`) is rewritten with the gateways' `seen`: when it has none
    yet, or the gateways' is at least `every` seconds newer (the status is not patched on every request)."""
    return written is None or seen - written >= every
