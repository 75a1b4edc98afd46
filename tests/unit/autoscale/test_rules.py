"""The autoscaler's small decisions: which gateway pods to scrape, idleness, the status cadence."""

from __future__ import annotations

from typing import Any

from llm_operator.autoscale.rules import gateway_metrics_urls, idle_since, last_request_due, latest

CREATED, AVAILABLE, STARTED, NOW = 1_700_000_000.0, 1_700_000_100.0, 1_700_000_050.0, 1_700_000_500.0


def _pod(ip: str | None, ready: str | None) -> dict[str, Any]:
    status: dict[str, Any] = {"podIP": ip} if ip else {}
    if ready is not None:
        status["conditions"] = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": ready},
        ]
    return {"metadata": {"name": f"gw-{ip}"}, "status": status}


def _deployment(replicas: int, ready: int, available: str | None) -> dict[str, Any]:
    status: dict[str, Any] = {"readyReplicas": ready} if ready else {}
    if available is not None:
        status["conditions"] = [
            {"type": "Available", "status": available, "lastTransitionTime": "2023-11-14T22:15:00Z"}
        ]
    return {
        "metadata": {"name": "falcon", "creationTimestamp": "2023-11-14T22:13:20Z"},
        "spec": {"replicas": replicas},
        "status": status,
    }


def test_only_ready_pods_with_an_ip_are_scraped() -> None:
    pods = [
        _pod("10.0.0.1", "True"),
        _pod("10.0.0.2", "False"),
        _pod(None, "True"),
        _pod("10.0.0.3", None),
        {"metadata": {"name": "no-status"}},
        _pod("10.0.0.4", "True"),
    ]
    assert gateway_metrics_urls(pods, 9090) == [
        "http://10.0.0.1:9090/metrics",
        "http://10.0.0.4:9090/metrics",
    ]


def test_idleness_counts_from_the_latest_of_start_creation_and_availability() -> None:
    assert idle_since(_deployment(1, 1, "True"), 1, NOW, STARTED) == AVAILABLE
    assert idle_since(_deployment(1, 1, "True"), 1, NOW, NOW - 1) == NOW - 1  # the autoscaler started later
    assert idle_since(_deployment(1, 1, "False"), 1, NOW, CREATED - 10) == CREATED  # not available: creation
    assert idle_since(_deployment(0, 0, None), 0, NOW, CREATED - 10) == CREATED  # at zero: creation


def test_replicas_still_loading_are_not_idle() -> None:
    assert idle_since(_deployment(2, 0, "True"), 2, NOW, STARTED) == NOW


def test_latest_ignores_unknown_moments() -> None:
    assert latest(None, 3.0, 5.0, None) == 5.0
    assert latest(None, None) is None


def test_last_request_time_is_rewritten_when_unset_or_old_enough() -> None:
    assert last_request_due(100.0, None, 10.0)
    assert last_request_due(110.0, 100.0, 10.0)
    assert not last_request_due(109.0, 100.0, 10.0)
    assert not last_request_due(90.0, 100.0, 10.0)
