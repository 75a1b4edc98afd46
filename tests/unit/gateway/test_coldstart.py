"""The cold-start breakdown: pod timestamps, phases marked once, relative to the first held request."""

from __future__ import annotations

import datetime as dt

import pytest

from llm_operator.gateway.coldstart import ColdStart, ColdStarts, pod_timestamps

BEGAN = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC).timestamp()


def _pod(ready: str = "True") -> dict[str, object]:
    return {
        "status": {
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-26T12:00:01Z"},
                {"type": "Ready", "status": ready, "lastTransitionTime": "2026-11-26T12:00:31Z"},
            ],
            "containerStatuses": [
                {"name": "server", "state": {"running": {"startedAt": "2026-11-26T12:00:03Z"}}},
                {"name": "sidecar", "state": {"waiting": {"reason": "ContainerCreating"}}},
            ],
        }
    }


def test_pod_timestamps_read_scheduling_start_and_readiness() -> None:
    assert pod_timestamps(_pod()) == {
        "scheduled": BEGAN + 1,
        "process_started": BEGAN + 3,
        "model_loaded": BEGAN + 31,
    }


def test_a_pod_not_ready_yet_or_without_status_gives_what_it_has() -> None:
    assert "model_loaded" not in pod_timestamps(_pod(ready="False"))
    assert pod_timestamps({}) == {}
    broken = {"status": {"conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": 7}]}}
    assert pod_timestamps(broken) == {}


def test_phases_are_seconds_since_the_first_held_request_and_marked_once() -> None:
    cold = ColdStart(began=BEGAN, began_monotonic=100.0)
    cold.mark("trigger", 100.05)
    cold.mark("ready", 131.5)
    cold.mark("ready", 140.0)  # a later held request does not move it
    cold.mark("first_byte", 131.7)
    cold.add_pod(_pod())
    assert cold.marks == pytest.approx(
        {
            "trigger": 0.05,
            "scheduled": 1.0,
            "process_started": 3.0,
            "model_loaded": 31.0,
            "ready": 31.5,
            "first_byte": 31.7,
        }
    )
    assert cold.summary() == (
        "trigger 0.05s, scheduled 1.00s, process_started 3.00s, model_loaded 31.00s, "
        "ready 31.50s, first_byte 31.70s"
    )


def test_one_wake_per_endpoint_is_timed_from_its_first_held_request_to_its_first_byte() -> None:
    key, other = ("ml", "falcon"), ("ml", "llama")
    starts = ColdStarts()
    cold = starts.begin(key, BEGAN, 100.0)
    assert starts.begin(key, BEGAN + 5, 105.0) is cold  # a later held request joins the same wake
    starts.mark(key, "trigger", 100.2)
    starts.mark(other, "trigger", 100.3)  # no wake under way there: nothing to mark
    assert starts.first_byte(key, cold, 131.0)
    assert not starts.first_byte(key, cold, 132.0)  # closed once, by whichever held request is first
    assert cold.marks == pytest.approx({"trigger": 0.2, "first_byte": 31.0})
    assert starts.begin(key, BEGAN + 60, 160.0) is not cold  # the next scale from zero is a new wake


def test_an_abandoned_wake_is_never_reported() -> None:
    key = ("ml", "falcon")
    starts = ColdStarts()
    cold = starts.begin(key, BEGAN, 100.0)
    starts.abandon(key)
    starts.mark(key, "trigger", 100.2)
    assert not starts.first_byte(key, cold, 131.0)
    assert cold.marks == {}
