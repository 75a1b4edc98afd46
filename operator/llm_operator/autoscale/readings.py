"""Request metrics as the autoscaler reads them: a gateway's `/metrics` text or a Prometheus query's answer ->
readings by endpoint. Pure; `sources.py` fetches the text.

A text or an answer that does not say what the autoscaler needs raises `MetricsUnavailable`, so a malformed
reading is "metrics unavailable" (every endpoint keeps its replicas) and any other exception is a bug.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from llm_operator.contract import IN_FLIGHT, LAST_REQUEST, METRIC_LABELS
from llm_operator.objects import Key

METRIC_NAMESPACE, METRIC_ENDPOINT = METRIC_LABELS
BY_ENDPOINT = ", ".join(METRIC_LABELS)
GATEWAY_SELECTOR = 'job=~".*gateway.*"'
"""Label matchers of the gateways' scrape targets in Prometheus (the chart's ServiceMonitor names the job
after the gateway Service, `<release>-gateway`)."""


class MetricsUnavailable(ValueError):
    """The request metrics cannot be read this tick: no gateway, a refused query, an unparsable answer."""


@dataclass(frozen=True)
class Reading:
    """One endpoint's request metrics, all gateways together."""

    in_flight: float = 0.0
    last_request: float | None = None


def merge(readings: Sequence[Mapping[Key, Reading]]) -> dict[Key, Reading]:
    """Sum in-flight and take the latest request time across gateways."""
    out: dict[Key, Reading] = {}
    for reading in readings:
        for key, r in reading.items():
            prev = out.get(key, Reading())
            last = max((t for t in (prev.last_request, r.last_request) if t is not None), default=None)
            out[key] = Reading(prev.in_flight + r.in_flight, last)
    return out


def _combine(in_flight: Mapping[Key, float], last: Mapping[Key, float]) -> dict[Key, Reading]:
    return {k: Reading(in_flight.get(k, 0.0), last.get(k)) for k in in_flight.keys() | last.keys()}


def parse_gateway_metrics(text: str) -> dict[Key, Reading]:
    """A gateway's `/metrics` text -> readings by endpoint."""
    in_flight: dict[Key, float] = {}
    last: dict[Key, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.labels.get(METRIC_NAMESPACE, ""), sample.labels.get(METRIC_ENDPOINT, ""))
                if sample.name == IN_FLIGHT:
                    in_flight[key] = in_flight.get(key, 0.0) + sample.value
                elif sample.name == LAST_REQUEST:
                    last[key] = max(last.get(key, 0.0), sample.value)
    except ValueError as error:  # what the exposition parser raises on text it cannot read
        raise MetricsUnavailable(f"unparsable metrics text: {error}") from error
    return _combine(in_flight, last)


def gateway_series(metric: str, selector: str = GATEWAY_SELECTOR) -> str:
    """PromQL for a gateway metric with the gateway's own `namespace` and `endpoint` labels.

    Without `honor_labels`, Prometheus keeps a scrape target's labels and renames clashing ones from the
    scraped series to `exported_<name>`: the Prometheus Operator gives every target `namespace` (the
    gateway's) and `endpoint` (the port name), so the endpoint's labels arrive as `exported_namespace` and
    `exported_endpoint`. Copying those back makes the queries right with `honor_labels` on or off.
    """
    expression = f"{metric}{{{selector}}}"
    for label in METRIC_LABELS:
        expression = f'label_replace({expression}, "{label}", "$1", "exported_{label}", "(.+)")'
    return expression


def up_query(selector: str = GATEWAY_SELECTOR) -> str:
    """Whether Prometheus scrapes each gateway target (1) or cannot (0)."""
    return f"up{{{selector}}}"


def in_flight_query(selector: str = GATEWAY_SELECTOR) -> str:
    """The latest scraped in-flight value of each endpoint, summed over gateway replicas."""
    return f"sum by ({BY_ENDPOINT}) ({gateway_series(IN_FLIGHT, selector)})"


def last_request_query(selector: str = GATEWAY_SELECTOR) -> str:
    """The latest request time of each endpoint over gateway replicas."""
    return f"max by ({BY_ENDPOINT}) ({gateway_series(LAST_REQUEST, selector)})"


Series = tuple[dict[str, str], float]
"""One instant-vector element: its labels and its value."""


def prometheus_vector(url: str, query: str, status: int, text: str) -> list[Series]:
    """The instant vector of a `/api/v1/query` answer (HTTP `status`, body `text`)."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict) or status != 200 or body.get("status") != "success":
        detail = (
            f"{body.get('errorType', 'error')}: {body.get('error')}"
            if isinstance(body, dict) and body.get("error")
            else text.strip()[:200] or "empty answer"
        )
        raise MetricsUnavailable(f"prometheus {url} answered HTTP {status} to {query!r}: {detail}")
    data = body.get("data")
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, list):
        raise MetricsUnavailable(f"prometheus {url} answered {query!r} without a result list")
    return [_series(url, query, item) for item in result]


def _series(url: str, query: str, item: Any) -> Series:
    metric = item.get("metric") if isinstance(item, dict) else None
    value = item.get("value") if isinstance(item, dict) else None
    try:
        if not isinstance(metric, dict) or not isinstance(value, list) or len(value) != 2:
            raise TypeError(f"not a vector element: {item!r:.200}")
        return {str(k): str(v) for k, v in metric.items()}, float(value[1])
    except (TypeError, ValueError) as error:
        raise MetricsUnavailable(f"prometheus {url} answered {query!r} with {error}") from error


def require_scraped(up: Sequence[Series], base_url: str, selector: str) -> None:
    """Refuse a reading unless Prometheus scrapes a gateway and every one it should (`up == 1`): missing
    series must not read as "no requests"."""
    if not up:
        raise MetricsUnavailable(f"prometheus {base_url} scrapes no gateway (no series {up_query(selector)})")
    if down := sorted(labels.get("instance", "?") for labels, value in up if value != 1):
        raise MetricsUnavailable(
            f"prometheus {base_url} cannot scrape gateway(s) {', '.join(down)} (up == 0)"
        )


def by_endpoint(vector: Sequence[Series]) -> dict[Key, float]:
    return {(labels.get(METRIC_NAMESPACE, ""), labels.get(METRIC_ENDPOINT, "")): v for labels, v in vector}


def prometheus_reading(in_flight: Sequence[Series], last: Sequence[Series]) -> dict[Key, Reading]:
    """Readings from the answers to `in_flight_query` and `last_request_query`."""
    return _combine(by_endpoint(in_flight), by_endpoint(last))
