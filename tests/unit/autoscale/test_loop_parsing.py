"""Reading the gateways' metrics: the text a real GatewayMetrics exposes, summed across gateways."""

from __future__ import annotations

from prometheus_client import generate_latest

from llm_operator.autoscale.loop import Reading, merge, parse_gateway_metrics
from llm_operator.gateway.metrics import GatewayMetrics


def _exposed(in_flight: int, last: float) -> str:
    metrics = GatewayMetrics()
    for _ in range(in_flight + 1):
        metrics.started(("ml", "falcon"), last)
    metrics.finished(("ml", "falcon"), 200)
    metrics.cold_start_phase(("ml", "falcon"), "ready", 3.0)
    return generate_latest(metrics.registry).decode()


def test_parse_reads_in_flight_and_last_request() -> None:
    assert parse_gateway_metrics(_exposed(2, 1_700_000_000.0)) == {
        ("ml", "falcon"): Reading(2.0, 1_700_000_000.0)
    }


def test_merge_sums_in_flight_and_keeps_the_latest_request() -> None:
    a = parse_gateway_metrics(_exposed(2, 100.0))
    b = parse_gateway_metrics(_exposed(3, 200.0))
    c = {("ml", "other"): Reading(1.0, None)}
    assert merge([a, b, c]) == {("ml", "falcon"): Reading(5.0, 200.0), ("ml", "other"): Reading(1.0, None)}
