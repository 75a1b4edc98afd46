"""Per-endpoint gauges the operator exports, for dashboards and alerts (labels `namespace`, `endpoint`).

- `llm_endpoint_replicas{kind="desired"|"ready"}` — replicas the Deployment wants and has ready;
- `llm_endpoint_gpus_per_replica` — `nvidia.com/gpu` each replica requests;
- `llm_endpoint_phase{phase}` — 1 for the endpoint's current phase, 0 for the others;
- `llm_endpoint_degraded` — 1 while the Degraded condition is True;
- `llm_endpoint_load_progress{phase}` — 0..1 through its loading phase, of the least advanced loading replica
  (from its `/status`); 0 for the other phases; no series while no replica loads.
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import Gauge

from llm_contract import LoadStatus
from llm_operator.api.v1alpha1 import LLMEndpoint, LLMEndpointStatus, Phase
from llm_operator.contract import LOAD_PROGRESS
from llm_operator.progress import LOADING_PHASES, fraction

LABELS = ("namespace", "endpoint")
REPLICAS = Gauge("llm_endpoint_replicas", "Replicas of the endpoint, desired and ready", (*LABELS, "kind"))
GPUS = Gauge("llm_endpoint_gpus_per_replica", "GPUs each replica of the endpoint requests", LABELS)
PHASE = Gauge("llm_endpoint_phase", "1 for the endpoint's current phase", (*LABELS, "phase"))
DEGRADED = Gauge("llm_endpoint_degraded", "1 while the endpoint's Degraded condition is True", LABELS)
LOAD = Gauge(
    LOAD_PROGRESS, "0..1 through its loading phase, of the least advanced loading replica", (*LABELS, "phase")
)
PHASES: tuple[str, ...] = get_args(Phase)


def record(endpoint: LLMEndpoint, status: LLMEndpointStatus) -> None:
    """Sets the endpoint's gauges from the status just computed."""
    key = (endpoint.metadata.namespace, endpoint.metadata.name)
    REPLICAS.labels(*key, "desired").set(status.replicas or 0)
    REPLICAS.labels(*key, "ready").set(status.ready_replicas or 0)
    GPUS.labels(*key).set(endpoint.spec.gpus)
    for phase in PHASES:
        PHASE.labels(*key, phase).set(1 if status.phase == phase else 0)
    degraded = status.condition("Degraded")
    DEGRADED.labels(*key).set(1 if degraded is not None and degraded.status == "True" else 0)


def record_progress(endpoint: LLMEndpoint, slowest: LoadStatus | None) -> None:
    """Sets the load progress gauge from the least advanced loading replica (removes it when none loads)."""
    key = (endpoint.metadata.namespace, endpoint.metadata.name)
    for phase in LOADING_PHASES:
        if slowest is None:
            _remove(LOAD, *key, phase)
        else:
            LOAD.labels(*key, phase).set(fraction(slowest) if phase == slowest.phase else 0)


def forget(namespace: str, name: str) -> None:
    """Drops a deleted endpoint's series."""
    for kind in ("desired", "ready"):
        _remove(REPLICAS, namespace, name, kind)
    for phase in PHASES:
        _remove(PHASE, namespace, name, phase)
    _remove(GPUS, namespace, name)
    _remove(DEGRADED, namespace, name)
    for phase in LOADING_PHASES:
        _remove(LOAD, namespace, name, phase)


def _remove(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        return
