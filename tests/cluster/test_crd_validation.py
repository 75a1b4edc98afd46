"""The real kube-apiserver, with the generated CRD, refuses each wrong manifest naming the field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from llm_devstack.controlplane import Cluster
from llm_devstack.paths import EXAMPLES
from llm_devstack.resources import endpoint, install_crd, new_namespace
from tests.cluster.operator_support import kubectl_apply

pytestmark = pytest.mark.cluster

REPO = {"repository": "org/model"}
A100x4 = {"type": "nvidia-a100-80gb", "count": 4}

# (id, spec, metadata name, text the refusal must contain)
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "min-above-max",
        {"model": REPO, "scaling": {"minReplicas": 3, "maxReplicas": 2}},
        "bad",
        "spec.scaling.minReplicas",
    ),
    (
        "tp-not-dividing-gpus",
        {"model": REPO, "accelerator": A100x4, "tensorParallelSize": 3},
        "bad",
        "spec.tensorParallelSize",
    ),
    (
        "input-not-below-total",
        {"model": REPO, "generation": {"maxInputTokens": 2048, "maxTotalTokens": 2048}},
        "bad",
        "spec.generation.maxInputTokens",
    ),
    (
        "batch-below-total",
        {"model": REPO, "generation": {"maxTotalTokens": 4096, "maxBatchTotalTokens": 1024}},
        "bad",
        "spec.generation.maxBatchTotalTokens",
    ),
    (
        "malformed-duration",
        {"model": REPO, "scaling": {"scaleToZeroAfter": "15 minutes"}},
        "bad",
        "spec.scaling.scaleToZeroAfter",
    ),
    (
        "negative-duration",
        {"model": REPO, "scaling": {"scaleToZeroAfter": "-5m"}},
        "bad",
        "spec.scaling.scaleToZeroAfter",
    ),
    ("unknown-access", {"model": REPO, "access": "secret"}, "bad", "spec.access"),
    (
        "negative-gpu-count",
        {"model": REPO, "accelerator": {"type": "nvidia-l4", "count": -1}},
        "bad",
        "spec.accelerator.count",
    ),
    (
        "too-many-gpus",
        {"model": REPO, "accelerator": {"type": "nvidia-l4", "count": 17}},
        "bad",
        "spec.accelerator.count",
    ),
    ("unknown-gpu", {"model": REPO, "accelerator": {"type": "nvidia-b9000"}}, "bad", "spec.accelerator.type"),
    ("zero-tp", {"model": REPO, "tensorParallelSize": 0}, "bad", "spec.tensorParallelSize"),
    ("empty-repository", {"model": {"repository": ""}}, "bad", "spec.model.repository"),
    ("repository-with-dashes", {"model": {"repository": "org--x/model"}}, "bad", "spec.model.repository"),
    ("repository-three-parts", {"model": {"repository": "a/b/c"}}, "bad", "spec.model.repository"),
    ("revision-with-space", {"model": {**REPO, "revision": "my branch"}}, "bad", "spec.model.revision"),
    ("revision-short-commit", {"model": {**REPO, "revision": "abc1234"}}, "bad", "spec.model.revision"),
    ("revision-dotdot", {"model": {**REPO, "revision": "v1/../x"}}, "bad", "spec.model.revision"),
    ("revision-lock", {"model": {**REPO, "revision": "main.lock"}}, "bad", "spec.model.revision"),
    ("two-sources", {"model": {**REPO, "path": "/models/x"}}, "bad", "spec.model"),
    ("no-source", {"model": {"dtype": "auto"}}, "bad", "spec.model"),
    ("no-model", {"access": "public"}, "bad", "spec.model"),
    (
        "revision-without-repository",
        {"model": {"path": "/m", "revision": "main"}},
        "bad",
        "spec.model.revision",
    ),
    ("relative-path", {"model": {"path": "models/x"}}, "bad", "spec.model.path"),
    ("pvc-without-claim", {"model": {"pvc": {"subPath": "x"}}}, "bad", "spec.model.pvc.claimName"),
    ("bad-package", {"model": {"package": "-nope"}}, "bad", "spec.model.package"),
    ("bad-dtype", {"model": {**REPO, "dtype": "float8"}}, "bad", "spec.model.dtype"),
    ("zero-max-replicas", {"model": REPO, "scaling": {"maxReplicas": 0}}, "bad", "spec.scaling.maxReplicas"),
    (
        "negative-min-replicas",
        {"model": REPO, "scaling": {"minReplicas": -1}},
        "bad",
        "spec.scaling.minReplicas",
    ),
    (
        "zero-target",
        {"model": REPO, "scaling": {"targetConcurrency": 0}},
        "bad",
        "spec.scaling.targetConcurrency",
    ),
    (
        "target-above-server-limit",
        {"model": REPO, "scaling": {"targetConcurrency": 64}, "generation": {"maxConcurrentRequests": 16}},
        "bad",
        "spec.scaling.targetConcurrency",
    ),
    (
        "key-for-public",
        {"model": REPO, "access": "public", "apiKeySecretRef": {"name": "k"}},
        "bad",
        "spec.apiKeySecretRef",
    ),
    (
        "gpu-in-resources",
        {"model": REPO, "resources": {"limits": {"nvidia.com/gpu": 1}}},
        "bad",
        "spec.resources",
    ),
    (
        "bad-quantity",
        {"model": REPO, "resources": {"requests": {"memory": "lots"}}},
        "bad",
        "spec.resources.requests",
    ),
    ("hf-token-in-env", {"model": REPO, "env": [{"name": "HF_TOKEN", "value": "hf_x"}]}, "bad", "spec.env"),
    (
        "duplicate-env",
        {"model": REPO, "env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
        "bad",
        "spec.env[1]",
    ),
    ("bad-env-name", {"model": REPO, "env": [{"name": "1X", "value": "1"}]}, "bad", "spec.env[0].name"),
    (
        "exists-with-value",
        {"model": REPO, "tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
        "bad",
        "spec.tolerations[0].value",
    ),
    ("bad-cache-size", {"model": REPO, "cache": {"size": "big"}}, "bad", "spec.cache.size"),
    ("unknown-field", {"model": REPO, "replicas": 3}, "bad", "spec.replicas"),
    ("name-too-long", {"model": REPO}, "a" * 51, "metadata.name"),
    (
        "adapter-names-repeat",
        {"model": REPO, "adapters": [{"name": "sql", "path": "/a"}, {"name": "sql", "repository": "org/b"}]},
        "bad",
        "spec.adapters[].name must be unique",
    ),
    (
        "too-many-adapters",
        {"model": REPO, "adapters": [{"name": f"a{i}", "path": f"/a{i}"} for i in range(17)]},
        "bad",
        "spec.adapters: Too many: 17",
    ),
    ("adapter-without-source", {"model": REPO, "adapters": [{"name": "sql"}]}, "bad", "spec.adapters[0]"),
    (
        "adapter-two-sources",
        {"model": REPO, "adapters": [{"name": "sql", "path": "/a", "package": "p"}]},
        "bad",
        "spec.adapters[0]",
    ),
    (
        "adapter-name-not-a-label",
        {"model": REPO, "adapters": [{"name": "SQL_v1", "path": "/a"}]},
        "bad",
        "spec.adapters[0].name",
    ),
    (
        "adapter-named-like-the-base-model",
        {"model": REPO, "adapters": [{"name": "tgi", "path": "/a"}]},
        "bad",
        "spec.adapters[0].name",
    ),
    (
        "adapters-with-tensor-parallelism",
        {"model": REPO, "accelerator": A100x4, "adapters": [{"name": "sql", "path": "/a"}]},
        "bad",
        "spec.adapters: Invalid value",
    ),
    (
        "adapter-revision-without-repository",
        {"model": REPO, "adapters": [{"name": "sql", "path": "/a", "revision": "main"}]},
        "bad",
        "spec.adapters[0].revision",
    ),
]


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> str:
    install_crd(cluster)
    return new_namespace(cluster, "crd")


@pytest.mark.parametrize(("case", "spec", "name", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_refused_naming_the_field(
    cluster: Cluster, namespace: str, case: str, spec: dict[str, Any], name: str, field: str
) -> None:
    result = kubectl_apply(cluster, endpoint(name, namespace, spec), check=False, extra=["--dry-run=server"])
    assert result.returncode != 0, f"{case} was accepted"
    assert field in result.stderr, f"{case}: the refusal does not name {field}: {result.stderr}"


def test_there_are_at_least_25_cases() -> None:
    assert len(INVALID) >= 25


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_are_accepted(cluster: Cluster, namespace: str, example: str) -> None:
    body = yaml.safe_load((EXAMPLES / example).read_text())
    body["metadata"]["namespace"] = namespace
    result = kubectl_apply(cluster, body, check=False, extra=["--dry-run=server"])
    assert result.returncode == 0, result.stderr


def test_defaults_are_applied(cluster: Cluster, namespace: str) -> None:
    kubectl_apply(cluster, endpoint("defaults", namespace, {"model": REPO}))
    spec = yaml.safe_load(cluster.kubectl("get", "llme", "defaults", "-n", namespace, "-o", "yaml").stdout)[
        "spec"
    ]
    assert spec["scaling"] == {
        "minReplicas": 0,
        "maxReplicas": 1,
        "targetConcurrency": 8,
        "scaleToZeroAfter": "15m",
    }
    assert spec["access"] == "protected"
    assert spec["model"]["dtype"] == "auto"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"storageClassName": "slow"}, "spec.cache.storageClassName"),
        ({"size": "100Gi"}, "spec.cache.size"),
        ({"accessMode": "ReadWriteMany"}, "spec.cache.accessMode"),
    ],
)
def test_cache_fields_are_guarded_on_update(
    cluster: Cluster, namespace: str, change: dict[str, str], field: str
) -> None:
    name = f"cache-{field.rsplit('.', 1)[-1].lower()}"
    original = endpoint(
        name, namespace, {"model": REPO, "cache": {"size": "200Gi", "storageClassName": "fast"}}
    )
    kubectl_apply(cluster, original)
    changed = copy.deepcopy(original)
    changed["spec"]["cache"].update(change)
    result = kubectl_apply(cluster, changed, check=False)
    assert result.returncode != 0, f"changing {field} was accepted"
    assert field in result.stderr, result.stderr
    grown = copy.deepcopy(original)
    grown["spec"]["cache"]["size"] = "300Gi"
    assert kubectl_apply(cluster, grown, check=False).returncode == 0


def test_printer_columns(cluster: Cluster, namespace: str) -> None:
    kubectl_apply(cluster, endpoint("columns", namespace, {"model": REPO, "accelerator": A100x4}))
    header = cluster.kubectl("get", "llme", "columns", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "READY", "URL", "GPUS", "REASON", "MESSAGE", "AGE"]
    wide = cluster.kubectl("get", "llme", "columns", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "PHASE", "READY", "URL", "GPUS", "REASON", "MESSAGE", "MODEL", "AGE"]
    assert "4" in wide[1].split()
    assert "llme" in cluster.kubectl("api-resources", "--api-group=llm-endpoints.io").stdout
