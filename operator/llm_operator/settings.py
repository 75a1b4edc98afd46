"""Operator-wide settings: what the operator's flags decide."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Literal

from llm_operator.contract import GATEWAY_LABELS, OPERATOR_LABELS, SERVING_PORT, endpoint_url

ImagePolicy = Literal["any", "default-only", "allow-list"]
IMAGE_POLICIES: tuple[ImagePolicy, ...] = ("any", "default-only", "allow-list")
HUB_URL = "https://huggingface.co"
"""The Hugging Face Hub, where revisions are resolved unless `Settings.hf_endpoint` names another."""
SERVING_IMAGE = f"ghcr.io/llm-endpoints/llm-serving:{version('llm-operator')}"
"""The serving image of this release (the operator's package version is the release's)."""


@dataclass(frozen=True)
class Settings:
    """What the operator's flags decide; render and status read it, never the environment."""

    image: str = SERVING_IMAGE
    """Serving image for endpoints that set no spec.image."""
    port: int = SERVING_PORT
    """Port the serving container listens on."""
    system_namespace: str = "llm-system"
    """Namespace of the operator (its Lease) and, unless gateway_namespace says otherwise, the gateway."""
    gateway_namespace: str | None = None
    """Namespace of the gateway pods, the only pods endpoints' NetworkPolicies admit (None: system's)."""
    gateway_labels: Mapping[str, str] = field(default_factory=lambda: GATEWAY_LABELS)
    """Labels that select the gateway pods in gateway_namespace."""
    operator_labels: Mapping[str, str] = field(default_factory=lambda: OPERATOR_LABELS)
    """Labels that select the operator's pods in system_namespace (admitted to the serving port)."""
    hf_endpoint: str | None = None
    """The Hub's base URL (a mirror, or a stand-in in tests): revisions are resolved there and serving pods
    get it as HF_ENDPOINT; None: the Hugging Face Hub, and no HF_ENDPOINT."""
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
    def hub_url(self) -> str:
        """Where revisions are resolved."""
        return (self.hf_endpoint or HUB_URL).rstrip("/")

    @property
    def gateway_pods_namespace(self) -> str:
        """The namespace of the gateway pods."""
        return self.gateway_namespace or self.system_namespace

    def url(self, namespace: str, name: str) -> str:
        """The URL clients use for an endpoint."""
        return endpoint_url(self.gateway_url, namespace, name)
