"""objects: condition lookup and the RFC 3339 stamps of Kubernetes fields."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from llm_operator.objects import condition_true, conditions, parse_rfc3339, rfc3339, rfc3339_micro

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_micro_time_format() -> None:
    assert rfc3339_micro(NOW) == "2026-01-01T12:00:00.000000Z"


def test_time_is_utc_in_whole_seconds() -> None:
    moment = datetime(2026, 1, 1, 14, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=2)))
    assert rfc3339(moment) == "2026-01-01T12:00:00Z"


@pytest.mark.parametrize("text", ["2026-01-01T12:00:00Z", "2026-01-01T12:00:00.000000Z"])
def test_stamps_parse_back(text: str) -> None:
    assert parse_rfc3339(text) == NOW


def test_conditions_by_type() -> None:
    pod = {"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled"}]}}
    assert set(conditions(pod)) == {"Ready", "PodScheduled"}
    assert condition_true(pod, "Ready")
    assert not condition_true(pod, "PodScheduled")
    assert not condition_true(pod, "Available")


@pytest.mark.parametrize("obj", [{}, {"status": None}, {"status": {"conditions": None}}])
def test_no_conditions(obj: dict[str, object]) -> None:
    assert conditions(obj) == {}
    assert not condition_true(obj, "Ready")
