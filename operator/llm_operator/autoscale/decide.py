"""`desired_replicas(window, spec, current, now)`: how many replicas an endpoint should run. Pure.

- Load is the average in-flight requests (held ones included) over `Tuning.window` seconds, summed over all
  gateways; the recommendation is `ceil(load / targetConcurrency)`.
- Up at once; down only to the highest recommendation of the last `scale_down_stabilization` seconds, and
  not at all while load is within `tolerance` of the current replicas' target: so it never flaps.
- With `minReplicas: 0` an endpoint goes to zero once nothing has been in flight for a whole window and the
  last request is `scaleToZeroAfter` old; from zero it is woken by the gateway, or here by held requests.
- Clamped to [minReplicas, maxReplicas]. Without fresh samples it keeps the current count (within bounds).
- A paused endpoint (`spec.paused`) wants zero replicas, whatever the load.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from llm_operator.api.v1alpha1 import LLMEndpointSpec, parse_duration


@dataclass(frozen=True)
class Sample:
    """Requests in flight for one endpoint, all gateways together, at unix time `at`."""

    at: float
    in_flight: float


@dataclass(frozen=True)
class Window:
    """What the decision reads: recent samples (oldest first) and request times."""

    samples: Sequence[Sample]
    last_request: float | None
    """Unix time of the latest request any gateway (or the endpoint's status) has seen."""
    idle_since: float
    """Where idleness starts counting when no request was seen: when the replicas became available (or
    now, while they load), creation, or the autoscaler's start, whichever is latest."""


@dataclass(frozen=True)
class Policy:
    """The endpoint's `spec.scaling`, in numbers."""

    min_replicas: int = 0
    max_replicas: int = 1
    target_concurrency: int = 8
    scale_to_zero_after: float = 900.0
    paused: bool = False
    """`spec.paused`: zero replicas, whatever the load."""

    @classmethod
    def from_spec(cls, spec: LLMEndpointSpec) -> Policy:
        scaling = spec.scaling
        return cls(
            scaling.min_replicas,
            scaling.max_replicas,
            scaling.target_concurrency,
            parse_duration(scaling.scale_to_zero_after).total_seconds(),
            spec.paused,
        )


@dataclass(frozen=True)
class Tuning:
    """The autoscaler's own knobs (operator flags, not per endpoint)."""

    window: float = 60.0
    """Seconds of samples averaged into the load."""
    scale_down_stabilization: float = 300.0
    """Seconds of recommendations a scale-down must respect."""
    tolerance: float = 0.1
    """Relative deviation from the target that changes nothing."""
    stale_after: float = 30.0
    """Seconds after which the newest sample is too old to act on."""

    @property
    def history(self) -> float:
        """Seconds of samples a decision needs."""
        return self.window + self.scale_down_stabilization


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str


class _Load:
    """Window averages over the samples with prefix sums."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.times = [s.at for s in samples]
        self.sums = [0.0]
        for s in samples:
            self.sums.append(self.sums[-1] + s.in_flight)

    def average(self, start: float, end: float) -> float:
        lo, hi = bisect.bisect_left(self.times, start), bisect.bisect_right(self.times, end)
        return (self.sums[hi] - self.sums[lo]) / (hi - lo) if hi > lo else 0.0

    def peak(self, start: float, end: float, samples: Sequence[Sample]) -> float:
        lo, hi = bisect.bisect_left(self.times, start), bisect.bisect_right(self.times, end)
        return max((s.in_flight for s in samples[lo:hi]), default=0.0)


def _clamp(replicas: int, spec: Policy) -> int:
    return min(max(replicas, spec.min_replicas), spec.max_replicas)


def desired_replicas(
    window: Window, spec: Policy, current: int, now: float, tuning: Tuning = Tuning()
) -> Decision:
    """The replica count the endpoint should have now, and why."""
    if spec.paused:
        return Decision(0, "spec.paused is set")
    samples = [s for s in window.samples if s.at <= now]
    if not samples or now - samples[-1].at > tuning.stale_after:
        kept = current if current == 0 and spec.min_replicas == 0 else _clamp(current, spec)
        return Decision(kept, "no recent request metrics: keeping the current count")
    load = _Load(samples)
    in_flight = samples[-1].in_flight
    average = load.average(now - tuning.window, now)
    target = spec.target_concurrency

    idle_for = now - max(window.last_request or window.idle_since, window.idle_since)
    quiet = load.peak(now - tuning.window, now, samples) == 0 and in_flight == 0
    if spec.min_replicas == 0 and quiet and idle_for >= spec.scale_to_zero_after:
        return Decision(
            0, f"no request for {idle_for:.0f}s (scaleToZeroAfter {spec.scale_to_zero_after:.0f}s)"
        )
    if current == 0 and in_flight == 0:
        return Decision(_clamp(0, spec), "scaled to zero and nothing in flight")

    wanted = math.ceil(average / target)
    if current > 0 and abs(average / (current * target) - 1) <= tuning.tolerance:
        wanted, reason = current, f"load {average:.2f} within {tuning.tolerance:.0%} of target"
    else:
        reason = f"average load {average:.2f} over {tuning.window:.0f}s at target {target}"
    if wanted < current:
        start = now - tuning.scale_down_stabilization
        recent = [math.ceil(load.average(t - tuning.window, t) / target) for t in load.times if t >= start]
        highest = max([wanted, *recent])
        if highest > wanted:
            wanted = min(current, highest)
            reason += (
                f"; scale-down held to the highest recommendation of {tuning.scale_down_stabilization:.0f}s"
            )
    wanted = max(wanted, 1)  # not idle long enough for zero, or requests are in flight
    bounded = _clamp(wanted, spec)
    if bounded != wanted:
        reason += f"; clamped to [{spec.min_replicas}, {spec.max_replicas}]"
    return Decision(bounded, reason)
