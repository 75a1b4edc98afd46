"""Operator-wide settings and the names shared by render, reconcile and the gateway."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

FIELD_MANAGER = "llm-operator"
"""The one field manager the operator applies children with."""
AUTOSCALER_FIELD_MANAGER = "llm-autoscaler"
"""The field manager that owns a serving Deployment's `spec.replicas`."""

ENDPOINT_LABEL = "llm-endpoints.io/endpoint"
"""On every child and pod: the LLMEndpoint's name (the Deployment's selector)."""
MANAGED_BY = {"app.kubernetes.io/managed-by": "llm-operator"}
"""On every child: what the operator's child watches select on."""
ACCESS_ANNOTATION = "llm-endpoints.io/access"
API_KEY_SECRET_ANNOTATION = "llm-endpoints.io/api-key-secret"
API_KEY_KEY_ANNOTATION = "llm-endpoints.io/api-key-key"
URL_ANNOTATION = "llm-endpoints.io/url"

# Labels of the gateway pods (the chart sets them and passes its own with --gateway-label): the autoscaler
# scrapes the ready ones, and the serving pods' NetworkPolicies admit only them.
GATEWAY_LABELS: Mapping[str, str] = MappingProxyType({"app.kubernetes.io/name": "llm-gateway"})
API_KEY_ENV = "API_KEY"
"""Env of a protected endpoint's serving container: the bearer token its server requires."""
API_KEY_REF_ANNOTATION = "llm-endpoints.io/api-key-ref"
"""On a protected endpoint's pod template: a hash of the key Secret's name and key (never of the token)."""
GRACEFUL_SHUTDOWN_ENV = "GRACEFUL_SHUTDOWN_SECONDS"
"""Env of the serving container: how long the server drains open streams after SIGTERM."""
ImagePolicy = Literal["any", "default-only", "allow-list"]
IMAGE_POLICIES: tuple[ImagePolicy, ...] = ("any", "default-only", "allow-list")
# The gateway's path prefix for endpoints: <gateway>/endpoints/<namespace>/<name>/<route>.
ENDPOINTS_PATH = "/endpoints"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "nvidia-a100-40gb": ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"),
        "nvidia-a100-80gb": ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"),
        "nvidia-h100-80gb": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"),
        "nvidia-h200-141gb": ("NVIDIA-H200", "NVIDIA-H200-NVL"),
        "nvidia-l4": ("NVIDIA-L4",),
        "nvidia-l40s": ("NVIDIA-L40S",),
        "nvidia-a10g": ("NVIDIA-A10G",),
        "nvidia-t4": ("Tesla-T4",),
    }
)
"""Accelerator type -> the `nvidia.com/gpu.product` values (GPU feature discovery) that satisfy it."""


@dataclass(frozen=True)
class Settings:
    """What the operator's flags decide; render and status read it, never the environment."""

    image: str = "ghcr.io/llm-endpoints/llm-serving:0.1.0"
    """Serving image for endpoints that set no spec.image."""
    port: int = 8080
    """Port the serving container listens on."""
    system_namespace: str = "llm-system"
    """Namespace of the operator (its Lease) and, unless gateway_namespace says otherwise, the gateway."""
    gateway_namespace: str | None = None
    """Namespace of the gateway pods, the only pods endpoints' NetworkPolicies admit (None: system's)."""
    gateway_labels: Mapping[str, str] = field(default_factory=lambda: GATEWAY_LABELS)
    """Labels that select the gateway pods in gateway_namespace."""
    gateway_url: str = "http://llm-gateway.llm-system.svc.cluster.local"
    """Base URL of the gateway; an endpoint's URL is `<gateway_url>/endpoints/<namespace>/<name>`."""
    termination_grace_seconds: int = 300
    """How long a stopping replica may take to finish its streams."""
    startup_seconds: int = 3600
    """How long a replica may take to load its model before it is restarted."""
    image_policy: ImagePolicy = "any"
    """Which spec.image an endpoint may name: any, only the default `image`, or one in allowed_images."""
    allowed_images: tuple[str, ...] = ()
    """Shell-style patterns (fnmatch, case-sensitive) of the images allowed under image_policy=allow-list."""
    serving_egress_ports: tuple[int, ...] = (443,)
    """TCP ports serving pods may connect to anywhere (model download over HTTPS), besides DNS."""

    @property
    def gateway_pods_namespace(self) -> str:
        """The namespace of the gateway pods."""
        return self.gateway_namespace or self.system_namespace

    def url(self, namespace: str, name: str) -> str:
        """The URL clients use for an endpoint."""
        return f"{self.gateway_url.rstrip('/')}{ENDPOINTS_PATH}/{namespace}/{name}"
