"""lease_action: who may act on the Lease."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from llm_operator.leader import lease_action
from llm_operator.objects import rfc3339_micro

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def lease(holder: str, renewed: datetime, seconds: int = 15) -> dict[str, object]:
    return {
        "spec": {
            "holderIdentity": holder,
            "renewTime": rfc3339_micro(renewed),
            "leaseDurationSeconds": seconds,
        }
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
