"""The Helm chart and the install manifest rendered from it, with the real helm and the real API server."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.cluster.harness import ROOT, Cluster

pytestmark = pytest.mark.cluster
CHART = ROOT / "charts" / "llm-endpoints"


def helm(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [str(cluster.bin_dir / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}: {result.stderr}"
    return result


def render(cluster: Cluster, *values: str) -> list[dict[str, Any]]:
    sets = [arg for value in values for arg in ("--set", value)]
    out = helm(cluster, "template", "rel", str(CHART), "--namespace", "llm-system", *sets).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_helm_lint_is_clean(cluster: Cluster) -> None:
    result = helm(cluster, "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


def test_every_rule_is_explicit_and_namespaced_when_asked(cluster: Cluster) -> None:
    cluster_wide = render(cluster)
    kinds = sorted(doc["kind"] for doc in cluster_wide)
    assert kinds.count("Deployment") == 2
    assert kinds.count("ClusterRoleBinding") == 2
    for doc in cluster_wide:
        for rule in doc.get("rules", ()):
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], doc["metadata"]["name"]

    namespaced = render(cluster, "watchNamespaces={team-a,team-b}")
    assert not [d for d in namespaced if d["kind"] == "ClusterRoleBinding"]
    bindings = {
        (d["metadata"]["namespace"], d["roleRef"]["name"]) for d in namespaced if d["kind"] == "RoleBinding"
    }
    assert ("team-a", "rel-llm-endpoints-operator") in bindings
    assert ("team-b", "rel-llm-endpoints-gateway") in bindings
    operator = next(
        d for d in namespaced if d["kind"] == "Deployment" and "operator" in d["metadata"]["name"]
    )
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args
    assert "--namespace=team-b" in args


def test_pods_meet_the_restricted_pod_security_standard(cluster: Cluster) -> None:
    for doc in render(cluster):
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("operator.replicas=0", "/operator/replicas"),
        ("gateway.holdTimeout=3", "holdTimeout"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("watchNamespaces={Bad_Name}", "/watchNamespaces/0"),
        ("gateway.service.port=70000", "/gateway/service/port"),
    ],
)
def test_a_wrong_value_fails_with_a_message_naming_it(cluster: Cluster, value: str, field: str) -> None:
    result = helm(cluster, "template", "rel", str(CHART), "--set", value, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert field in result.stderr


@pytest.fixture
def restricted_namespace(cluster: Cluster) -> Iterator[str]:
    name = f"llm-system-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


def test_the_restricted_admission_accepts_the_chart_pods(cluster: Cluster, restricted_namespace: str) -> None:
    """The API server's own PodSecurity admission, in enforce mode, admits every pod template."""
    for doc in render(cluster):
        if doc["kind"] != "Deployment":
            continue
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": doc["metadata"]["name"], "namespace": restricted_namespace},
            "spec": {**doc["spec"]["template"]["spec"], "serviceAccountName": "default"},
        }
        result = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
        assert result.returncode == 0, result.stderr


def test_install_manifest_applies_cleanly_twice(cluster: Cluster) -> None:
    manifest = str(ROOT / "dist" / "install.yaml")
    cluster.kubectl("apply", "--server-side", "-f", manifest)
    again = cluster.kubectl("apply", "--server-side", "-f", manifest).stdout.splitlines()
    assert again
    assert all(line.endswith("serverside-applied") for line in again)
    diff = cluster.kubectl("diff", "--server-side", "-f", manifest, check=False)
    assert diff.returncode == 0, diff.stdout
    cluster.kubectl("scale", "deployment", "--all", "-n", "llm-system", "--replicas=0")
