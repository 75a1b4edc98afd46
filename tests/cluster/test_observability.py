"""Every metric the Grafana dashboard and the alert rules query is one the project exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

import llm_operator.controller
import llm_operator.metrics
from llm_devstack.controlplane import Cluster
from llm_operator.gateway.metrics import GatewayMetrics
from llm_serving.metrics import Metrics as ServingMetrics
from tests.cluster.test_chart import CHART, render

pytestmark = pytest.mark.cluster
KEYWORDS = {"and", "or", "unless", "bool", "offset"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}


def series_names(registries: Iterable[CollectorRegistry]) -> set[str]:
    """The names of the series a scrape can return, suffixes included."""
    names = set()
    for registry in registries:
        for family in registry.collect():
            names.add(family.name)
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
    return names


def exported() -> set[str]:
    assert llm_operator.controller.RECONCILES  # the operator's own metrics live in the default registry
    return series_names([REGISTRY, GatewayMetrics().registry, ServingMetrics("model").registry])


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (grouping labels, matchers, ranges and calls removed)."""
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    return set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr)) - KEYWORDS


def test_metric_names_are_found_in_promql() -> None:
    expr = 'sum by (le) (rate(a_bucket{x="y"}[5m])) * on (ns) b and max(vllm:c_total) > 2'
    assert metric_names(expr) == {"a_bucket", "b", "vllm:c_total"}


def queried(expressions: Iterable[str]) -> set[str]:
    return {name for expr in expressions for name in metric_names(expr)}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((CHART / "dashboards" / "llm-endpoints.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    variables = [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs + [re.sub(r"label_values\((\w+(\{[^}]*\})?), \w+\)", r"\1", v) for v in variables]


def test_every_dashboard_query_names_an_exported_metric() -> None:
    names = queried(dashboard_expressions())
    assert len(names) >= 8
    assert names - exported() == set()


def test_the_dashboard_covers_what_operators_watch() -> None:
    dashboard = json.loads((CHART / "dashboards" / "llm-endpoints.json").read_text())
    titles = " ".join(panel["title"] for panel in dashboard["panels"])
    for topic in (
        "Requests",
        "In flight",
        "Time to first token",
        "Inter-token",
        "Replicas",
        "Cold starts",
        "GPUs",
    ):
        assert topic in titles


def test_every_alert_names_an_exported_metric(cluster: Cluster) -> None:
    rendered = render(cluster, "metrics.prometheusRule.enabled=true")
    rule = next(d for d in rendered if d["kind"] == "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {"LLMEndpointDegraded", "LLMEndpointWakeFailures", "LLMEndpointQueueGrowing"}
    names = queried(alerts.values())
    assert names == {
        "llm_endpoint_degraded",
        "llm_endpoint_phase",
        "llm_gateway_requests_total",
        "tgi_queue_size",
    }
    assert names - exported() == set()


def test_the_service_monitor_keeps_the_endpoint_labels(cluster: Cluster) -> None:
    """Alerts and dashboard group by the endpoint's `namespace` and `endpoint` labels, which the gateway and
    the operator set on their series: Prometheus must keep them, not replace them with the target's."""
    rendered = render(cluster, "metrics.serviceMonitor.enabled=true")
    monitor = next(d for d in rendered if d["kind"] == "ServiceMonitor")
    assert [e.get("honorLabels") for e in monitor["spec"]["endpoints"]] == [True, True]


GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$namespace": ".*", "$endpoint": ".*"}


def test_every_query_parses_as_promql(cluster: Cluster, tmp_path: Path) -> None:
    """promtool (Prometheus's own parser, from Debian's prometheus package) checks the alert rules as the
    chart renders them, and each dashboard query as a recording rule, Grafana's variables filled in."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make system-packages` (Debian's prometheus package)"
    rendered = render(cluster, "metrics.prometheusRule.enabled=true")
    rule = next(d for d in rendered if d["kind"] == "PrometheusRule")
    recorded = []
    for number, expr in enumerate(dashboard_expressions()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        recorded.append({"record": f"dashboard:query_{number}", "expr": expr})
    groups = [*rule["spec"]["groups"], {"name": "dashboard", "rules": recorded}]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rule['spec']['groups'][0]['rules']) + len(recorded)} rules found" in checked.stdout


def test_promtool_refuses_a_broken_query(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make system-packages` (Debian's prometheus package)"
    rules = tmp_path / "rules.yaml"
    broken = {"record": "x:y", "expr": "sum by (namespace (llm_gateway_requests_in_flight)"}
    rules.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [broken]}]}))
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert checked.returncode != 0
