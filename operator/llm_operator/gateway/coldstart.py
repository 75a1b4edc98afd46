"""The cold-start breakdown of one wake: when each step happened, in seconds since the first held request.

Phases, in the order they normally happen:
- `trigger` — the gateway's wake request (the endpoint's `status.wakeRequestedAt`) was accepted by the API
  server (the operator then scales the Deployment from zero);
- `scheduled` — the pod was bound to a node (its `PodScheduled` condition);
- `process_started` — the serving container started (`state.running.startedAt`);
- `model_loaded` — the pod became Ready: the server loaded its weights and answered its readiness probe;
- `ready` — the gateway saw the ready address in the endpoint's EndpointSlice and released held requests;
- `first_byte` — the first byte of the first held request's answer arrived from the replica.

The gateway measures `trigger`, `ready` and `first_byte` itself (milliseconds). The three pod phases come from
the timestamps Kubernetes records on the pod, which have one-second resolution. Pure apart from the clock
readings the caller passes in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_operator.objects import Key, conditions, parse_rfc3339

PHASES = ("trigger", "scheduled", "process_started", "model_loaded", "ready", "first_byte")
POD_PHASES = ("scheduled", "process_started", "model_loaded")


@dataclass
class ColdStart:
    """One wake of one endpoint, from the first held request's arrival."""

    began: float
    """Unix time the first held request arrived."""
    began_monotonic: float
    marks: dict[str, float] = field(default_factory=dict)
    """Phase -> seconds since `began`; each phase is marked once."""

    def mark(self, phase: str, monotonic_now: float) -> None:
        """Record `phase` at the monotonic clock reading `monotonic_now`, unless already recorded."""
        self.marks.setdefault(phase, monotonic_now - self.began_monotonic)

    def add_pod(self, pod: Mapping[str, Any]) -> None:
        """Add the pod phases from the timestamps Kubernetes recorded on the woken pod."""
        for phase, stamp in pod_timestamps(pod).items():
            self.marks.setdefault(phase, stamp - self.began)

    def summary(self) -> str:
        """`trigger 0.04s, scheduled 1.0s, ...` in phase order."""
        return ", ".join(f"{p} {self.marks[p]:.2f}s" for p in PHASES if p in self.marks)


class ColdStarts:
    """The wake under way per endpoint, from its first held request to its first answer byte."""

    def __init__(self) -> None:
        self._open: dict[Key, ColdStart] = {}

    def begin(self, key: Key, now: float, monotonic_now: float) -> ColdStart:
        """The endpoint's wake under way, begun now if none is (by the first request held for it)."""
        return self._open.setdefault(key, ColdStart(now, monotonic_now))

    def mark(self, key: Key, phase: str, monotonic_now: float) -> None:
        """Record `phase` of the endpoint's wake under way, if any."""
        if (cold := self._open.get(key)) is not None:
            cold.mark(phase, monotonic_now)

    def abandon(self, key: Key) -> None:
        """The wake failed or the endpoint went away: no breakdown for it."""
        self._open.pop(key, None)

    def first_byte(self, key: Key, cold: ColdStart, monotonic_now: float) -> bool:
        """Close `cold` at the first answer byte after its wake: True once, for whichever held request
        is first; False when it is closed (or abandoned) already."""
        if self._open.get(key) is not cold:
            return False
        del self._open[key]
        cold.mark("first_byte", monotonic_now)
        return True


def _parse(stamp: Any) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return parse_rfc3339(stamp).timestamp()
    except ValueError:
        return None


def pod_timestamps(pod: Mapping[str, Any]) -> dict[str, float]:
    """Unix times at which the pod was scheduled, its container started and it became Ready (those known)."""
    status = pod.get("status") or {}
    found: dict[str, float] = {}
    true = {kind: c for kind, c in conditions(pod).items() if c.get("status") == "True"}
    for phase, kind in (("scheduled", "PodScheduled"), ("model_loaded", "Ready")):
        if (stamp := _parse((true.get(kind) or {}).get("lastTransitionTime"))) is not None:
            found[phase] = stamp
    started = [
        stamp
        for container in status.get("containerStatuses") or ()
        if (stamp := _parse(((container.get("state") or {}).get("running") or {}).get("startedAt")))
        is not None
    ]
    if started:
        found["process_started"] = max(started)
    return found
