"""What the operator, the autoscaler, the gateway and the serving pods must agree on. Pure.

Labels and annotations on the objects the operator renders, the field managers that own their fields, the
gateway's URL layout, the metric names the autoscaler reads from the gateway, the ports and the environment
of the serving container (the last from `llm_contract`, which the serving image shares). Each side imports
these names from here, never from the other side's modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from llm_contract import API_KEY_ENV as API_KEY_ENV
from llm_contract import GRACEFUL_SHUTDOWN_ENV as GRACEFUL_SHUTDOWN_ENV
from llm_contract import HF_ENDPOINT_ENV as HF_ENDPOINT_ENV
from llm_contract import SERVING_PORT as SERVING_PORT
from llm_contract import STATUS_PATH as STATUS_PATH
from llm_operator.api.common import SecretKeyRef
from llm_operator.api.v1alpha1 import LLMEndpoint

OPERATOR = "llm-operator"
"""The operator's name: its field manager, the managed-by label of its children, its events' component."""

# Field managers (server-side apply and patches), so each side can tell its writes from the others'.
FIELD_MANAGER = OPERATOR
"""The one field manager the operator applies children with."""
AUTOSCALER_FIELD_MANAGER = "llm-autoscaler"
"""The field manager that owns a serving Deployment's `spec.replicas`."""
GATEWAY_FIELD_MANAGER = "llm-gateway"
"""The gateway's field manager: it owns an endpoint's `status.wakeRequestedAt` and nothing else."""

# Labels and annotations.
ENDPOINT_LABEL = "llm-endpoints.io/endpoint"
"""On every child, pod and EndpointSlice of an endpoint: its name (the serving Deployment's selector)."""
PART_OF = {"app.kubernetes.io/part-of": "llm-endpoints"}
"""On every object of the project: the chart's, the CRD and the operator's children."""
MANAGED_BY = {"app.kubernetes.io/managed-by": OPERATOR}
"""On every child: what the operator's child watches and the autoscaler's Deployment list select on."""
GATEWAY_LABELS: Mapping[str, str] = MappingProxyType({"app.kubernetes.io/name": "llm-gateway"})
"""Labels of the gateway pods (the chart sets them): the autoscaler scrapes the ready ones, and the serving
pods' NetworkPolicies admit only them."""
OPERATOR_LABELS: Mapping[str, str] = MappingProxyType({"app.kubernetes.io/name": "llm-operator"})
"""Labels of the operator pods (the chart sets them): the serving pods' NetworkPolicies admit them to the
serving port, where the operator reads each loading replica's `/status`."""
# On an endpoint's Service, for people reading it (`kubectl describe`); no component reads them.
ACCESS_ANNOTATION = "llm-endpoints.io/access"
API_KEY_SECRET_ANNOTATION = "llm-endpoints.io/api-key-secret"
API_KEY_KEY_ANNOTATION = "llm-endpoints.io/api-key-key"
URL_ANNOTATION = "llm-endpoints.io/url"
RESOLVE_ANNOTATION = "llm-endpoints.io/resolve-revision"
"""On an LLMEndpoint, set by a person: a value other than the one in `status.model.resolveRequest` makes the
operator resolve spec.model.revision to its commit again (and roll the replicas if it moved)."""
API_KEY_REF_ANNOTATION = "llm-endpoints.io/api-key-ref"
"""On a protected endpoint's pod template: a hash of the key Secret's name and key (never of the token)."""


# The gateway.
ENDPOINTS_PATH = "/endpoints"
"""The gateway routes `<gateway>/endpoints/<namespace>/<name>/<route>`; the operator publishes that URL."""
ADMIN_PORT = 9090
"""The gateway's admin port (`--admin-port`: /metrics, /healthz, /readyz); the autoscaler scrapes it."""
IN_FLIGHT = "llm_gateway_requests_in_flight"
"""Gauge: requests being proxied or held now (the autoscaler's load signal)."""
HELD = "llm_gateway_requests_held"
"""Gauge: of those, the ones waiting for a replica."""
REQUESTS = "llm_gateway_requests_total"
"""Counter: finished requests by HTTP status (`code`)."""
LAST_REQUEST = "llm_gateway_last_request_timestamp_seconds"
"""Gauge: unix time of the last request's arrival (the autoscaler's idle signal)."""
COLD_START = "llm_gateway_cold_start_seconds"
"""Histogram: one observation per wake and `phase`."""
METRIC_LABELS = ("namespace", "endpoint")
"""The labels naming an endpoint on every gateway metric."""
LOAD_PROGRESS = "llm_endpoint_load_progress"
"""Operator gauge (labels namespace, endpoint, phase): how far, 0..1, the endpoint's least advanced loading
replica is through its loading `phase` (Downloading, LoadingWeights, ...), read from its `/status`; the
series of other phases are 0, and all are removed once no replica loads."""


def endpoint_url(gateway_url: str, namespace: str, name: str) -> str:
    """The URL clients use for an endpoint behind the gateway at `gateway_url`."""
    return f"{gateway_url.rstrip('/')}{ENDPOINTS_PATH}/{namespace}/{name}"


def default_api_key_secret(endpoint: LLMEndpoint) -> str:
    """Name of the Secret the operator creates when a protected endpoint names none."""
    return f"{endpoint.metadata.name}-api-key"


def api_key_ref(endpoint: LLMEndpoint) -> SecretKeyRef | None:
    """The Secret holding a protected endpoint's bearer token (the operator creates the default one)."""
    if endpoint.spec.access != "protected":
        return None
    return endpoint.spec.api_key_secret_ref or SecretKeyRef(name=default_api_key_secret(endpoint))
