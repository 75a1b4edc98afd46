"""lease_action: who may act on the Lease."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from llm_operator.leader import lease_action, micro_time

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def lease(holder: str, renewed: datetime, seconds: int = 15) -> dict[str, object]:
    return {
        "spec": {"holderIdentity": holder, "renewTime": micro_time(renewed), "leaseDurationSeconds": seconds}
    }


def test_no_lease_creates() -> None:
    assert lease_action(None, "me", NOW) == "create"


def test_own_lease_renews() -> None:
    assert lease_action(lease("me", NOW - timedelta(seconds=100)), "me", NOW) == "renew"


def test_live_lease_of_another_waits() -> None:
    assert lease_action(lease("other", NOW - timedelta(seconds=5)), "me", NOW) == "wait"


def test_expired_lease_is_taken() -> None:
    assert lease_action(lease("other", NOW - timedelta(seconds=16)), "me", NOW) == "take"


def test_released_lease_is_taken_at_once() -> None:
    assert lease_action(lease("", NOW), "me", NOW) == "take"


def test_micro_time_format() -> None:
    assert micro_time(NOW) == "2026-01-01T12:00:00.000000Z"
