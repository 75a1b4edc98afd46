"""The gateway's per-endpoint request metrics (what the autoscaler reads) and the cold-start breakdown.

Names (defined in `contract`; all labelled `namespace`, `endpoint`):
- `llm_gateway_requests_in_flight` — requests being proxied or held now;
- `llm_gateway_requests_held` — of those, the ones waiting for a replica;
- `llm_gateway_requests_total{code}` — finished requests by HTTP status;
- `llm_gateway_last_request_timestamp_seconds` — unix time of the last request's arrival;
- `llm_gateway_cold_start_seconds{phase}` — one observation per wake and phase, in seconds since the wake's
  first held request arrived: `trigger`, `scheduled`, `process_started`, `model_loaded`, `ready`,
  `first_byte` (see `coldstart`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llm_operator.contract import COLD_START, HELD, IN_FLIGHT, LAST_REQUEST, REQUESTS
from llm_operator.contract import METRIC_LABELS as LABELS
from llm_operator.objects import Key

COLD_START_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class GatewayMetrics:
    """Metric families in their own registry, so several gateways can live in one process (tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.in_flight = Gauge(IN_FLIGHT, "Requests proxied or held now", LABELS, registry=r)
        self.held = Gauge(HELD, "Requests waiting for a replica", LABELS, registry=r)
        self.requests = Counter(
            REQUESTS.removesuffix("_total"), "Finished requests", (*LABELS, "code"), registry=r
        )
        self.last_request = Gauge(LAST_REQUEST, "Unix time of the last request's arrival", LABELS, registry=r)
        self.cold_start = Histogram(
            COLD_START,
            "Wake phases of requests that found no ready replica",
            (*LABELS, "phase"),
            buckets=COLD_START_BUCKETS,
            registry=r,
        )

    def started(self, key: Key, now: float) -> None:
        """A request for the endpoint arrived at unix time `now`."""
        self.in_flight.labels(*key).inc()
        self.last_request.labels(*key).set(now)

    def finished(self, key: Key, code: int) -> None:
        self.in_flight.labels(*key).dec()
        self.requests.labels(*key, str(code)).inc()

    def cold_start_phase(self, key: Key, phase: str, seconds: float) -> None:
        self.cold_start.labels(*key, phase).observe(max(0.0, seconds))

    def forget(self, key: Key) -> None:
        """Drop an endpoint's series once it is deleted and idle."""
        for family in (self.in_flight, self.held, self.last_request):
            try:
                family.remove(*key)
            except KeyError:
                continue
