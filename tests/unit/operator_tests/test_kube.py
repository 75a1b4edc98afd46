"""REST paths and credentials of the operator's API client."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llm_operator.kube import Credentials, resource_path


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (("v1", "Pod", "ml"), "/api/v1/namespaces/ml/pods"),
        (
            ("apps/v1", "Deployment", "ml", "falcon", "scale"),
            "/apis/apps/v1/namespaces/ml/deployments/falcon/scale",
        ),
        (
            ("llm-endpoints.io/v1alpha1", "LLMEndpoint", "ml", "falcon", "status"),
            "/apis/llm-endpoints.io/v1alpha1/namespaces/ml/llmendpoints/falcon/status",
        ),
        (
            ("coordination.k8s.io/v1", "Lease", "sys", "llm-operator"),
            "/apis/coordination.k8s.io/v1/namespaces/sys/leases/llm-operator",
        ),
        (
            ("policy/v1", "PodDisruptionBudget", "ml", "x"),
            "/apis/policy/v1/namespaces/ml/poddisruptionbudgets/x",
        ),
    ],
)
def test_resource_path(args: tuple[str, ...], path: str) -> None:
    assert resource_path(*args) == path


def test_credentials_from_a_token_kubeconfig(tmp_path: Path) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": "https://127.0.0.1:6443/", "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": "u", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    credentials = Credentials.load(str(path))
    assert credentials.server == "https://127.0.0.1:6443"
    assert credentials.bearer() == "secret-token"
    assert credentials.insecure
    assert credentials.token_path is None
