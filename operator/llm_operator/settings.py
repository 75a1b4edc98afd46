"""Operator-wide settings and the names shared by render, reconcile and the gateway."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

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

# Labels of the gateway pods (the chart sets them); the autoscaler scrapes the ready ones.
GATEWAY_LABELS: Mapping[str, str] = MappingProxyType({"app.kubernetes.io/name": "llm-gateway"})
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
    """Namespace of the operator and the gateway (allowed through endpoints' NetworkPolicies)."""
    gateway_url: str = "http://llm-gateway.llm-system.svc.cluster.local"
    """Base URL of the gateway; an endpoint's URL is `<gateway_url>/endpoints/<namespace>/<name>`."""
    termination_grace_seconds: int = 300
    """How long a stopping replica may take to finish its streams."""
    startup_seconds: int = 3600
    """How long a replica may take to load its model before it is restarted."""

    def url(self, namespace: str, name: str) -> str:
        """The URL clients use for an endpoint."""
        return f"{self.gateway_url.rstrip('/')}{ENDPOINTS_PATH}/{namespace}/{name}"
