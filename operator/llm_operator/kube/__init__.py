"""Our Kubernetes client: `client` (credentials, requests, streams), `errors` (the one mapping from an
answer to a typed error), `watch` (list then watch a collection)."""

from llm_operator.kube.client import Credentials, Kube, add_cluster_flags, resource_path
from llm_operator.kube.errors import (
    TRANSIENT,
    APIUnavailableError,
    ConflictError,
    ForbiddenError,
    GoneError,
    InvalidObjectError,
    KubeAPIError,
    NotFoundError,
    ServerBusyError,
    UnauthorizedError,
    api_error,
)

__all__ = [
    "TRANSIENT",
    "APIUnavailableError",
    "ConflictError",
    "Credentials",
    "ForbiddenError",
    "GoneError",
    "InvalidObjectError",
    "Kube",
    "KubeAPIError",
    "NotFoundError",
    "ServerBusyError",
    "UnauthorizedError",
    "add_cluster_flags",
    "api_error",
    "resource_path",
]
