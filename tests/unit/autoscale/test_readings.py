"""Reading the request metrics: a real GatewayMetrics' text, Prometheus answers, and what is refused."""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest

from llm_operator.autoscale.readings import (
    MetricsUnavailable,
    Reading,
    in_flight_query,
    last_request_query,
    merge,
    parse_gateway_metrics,
    prometheus_reading,
    prometheus_vector,
    require_scraped,
    up_query,
)
from llm_operator.contract import IN_FLIGHT, LAST_REQUEST
from llm_operator.gateway.metrics import GatewayMetrics

URL = "http://prometheus:9090/api/v1/query"


def _exposed(in_flight: int, last: float) -> str:
    metrics = GatewayMetrics()
    for _ in range(in_flight + 1):
        metrics.started(("ml", "falcon"), last)
    metrics.finished(("ml", "falcon"), 200)
    metrics.cold_start_phase(("ml", "falcon"), "ready", 3.0)
    return generate_latest(metrics.registry).decode()


def _answer(*series: tuple[dict[str, str], str]) -> str:
    result = [{"metric": labels, "value": [1_700_000_000.0, value]} for labels, value in series]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})


def test_parse_reads_in_flight_and_last_request() -> None:
    assert parse_gateway_metrics(_exposed(2, 1_700_000_000.0)) == {
        ("ml", "falcon"): Reading(2.0, 1_700_000_000.0)
    }


def test_merge_sums_in_flight_and_keeps_the_latest_request() -> None:
    a = parse_gateway_metrics(_exposed(2, 100.0))
    b = parse_gateway_metrics(_exposed(3, 200.0))
    c = {("ml", "other"): Reading(1.0, None)}
    assert merge([a, b, c]) == {("ml", "falcon"): Reading(5.0, 200.0), ("ml", "other"): Reading(1.0, None)}


@pytest.mark.parametrize("text", ["<html>502 Bad Gateway</html>\n", "x{a=1} 2\n", "metric notanumber\n"])
def test_unparsable_gateway_text_is_unavailable(text: str) -> None:
    with pytest.raises(MetricsUnavailable, match="unparsable metrics text"):
        parse_gateway_metrics(text)


def test_queries_name_the_metrics_by_endpoint_with_the_selector() -> None:
    selector = 'job="gw"'
    assert up_query(selector) == 'up{job="gw"}'
    assert in_flight_query(selector).startswith("sum by (namespace, endpoint) (label_replace(")
    assert f'{IN_FLIGHT}{{job="gw"}}' in in_flight_query(selector)
    assert last_request_query(selector).startswith("max by (namespace, endpoint) (")
    assert f'{LAST_REQUEST}{{job="gw"}}' in last_request_query(selector)


def test_prometheus_answers_make_readings() -> None:
    falcon = {"namespace": "ml", "endpoint": "falcon"}
    other = {"namespace": "ml", "endpoint": "other"}
    in_flight = prometheus_vector(URL, "q", 200, _answer((falcon, "3"), (other, "0")))
    last = prometheus_vector(URL, "q", 200, _answer((falcon, "1700000000.5")))
    assert prometheus_reading(in_flight, last) == {
        ("ml", "falcon"): Reading(3.0, 1_700_000_000.5),
        ("ml", "other"): Reading(0.0, None),
    }


@pytest.mark.parametrize(
    ("status", "text", "message"),
    [
        (400, json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error"}), "bad_data: "),
        (503, "", "HTTP 503 to 'q': empty answer"),
        (200, "not json", "HTTP 200 to 'q': not json"),
        (200, json.dumps({"status": "success"}), "without a result list"),
        (200, json.dumps({"status": "success", "data": {"result": [{"metric": {}}]}}), "not a vector"),
        (
            200,
            json.dumps({"status": "success", "data": {"result": [{"metric": {}, "value": [1, "x"]}]}}),
            "x",
        ),
    ],
)
def test_a_refused_or_malformed_prometheus_answer_is_unavailable(
    status: int, text: str, message: str
) -> None:
    with pytest.raises(MetricsUnavailable, match="prometheus http://prometheus") as refused:
        prometheus_vector(URL, "q", status, text)
    assert message in str(refused.value)


def test_a_reading_needs_every_gateway_scraped() -> None:
    up = prometheus_vector(
        URL, "up", 200, _answer(({"instance": "a:9090"}, "1"), ({"instance": "b:9090"}, "0"))
    )
    with pytest.raises(MetricsUnavailable, match=r"cannot scrape gateway\(s\) b:9090 \(up == 0\)"):
        require_scraped(up, "http://p", 'job="gw"')
    with pytest.raises(MetricsUnavailable, match=r'scrapes no gateway \(no series up\{job="gw"\}\)'):
        require_scraped([], "http://p", 'job="gw"')
    require_scraped(up[:1], "http://p", 'job="gw"')
