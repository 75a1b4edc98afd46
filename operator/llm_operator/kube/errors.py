"""What the API server's refusals mean: one mapping from an HTTP status and `Status` reason to a typed error.

Every part that talks to Kubernetes (the operator's reconcile, leader election and autoscaler, the gateway's
watches and wakes) gets these errors and decides on them, never on a bare status code.
"""

from __future__ import annotations

from typing import Any

from llm_operator.errors import OperatorError


class KubeAPIError(OperatorError):
    """The API server answered with an error status (the base of the specific ones below)."""

    def __init__(self, status: int, body: dict[str, Any] | str, what: str) -> None:
        self.status = status
        self.body = body
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        message = body.get("message", "") if isinstance(body, dict) else body[:500]
        super().__init__(f"{what}: HTTP {status} {self.reason}: {message}".strip())


class UnauthorizedError(KubeAPIError):
    """401: the credentials are not accepted (an expired or revoked token)."""


class ForbiddenError(KubeAPIError):
    """403: RBAC refuses the request (fix the Role, then it retries)."""


class NotFoundError(KubeAPIError):
    """404: no such object, or no such resource (a CRD not installed)."""


class ConflictError(KubeAPIError):
    """409: a precondition or resourceVersion no longer holds, or the object exists."""


class GoneError(KubeAPIError):
    """410 (reason Expired or Gone): the resourceVersion is too old to watch from; list again."""


class InvalidObjectError(KubeAPIError):
    """422: the API server refuses what was sent; a bug or an admission policy."""

    retryable = False


class ServerBusyError(KubeAPIError):
    """429, 500, 502, 503, 504: throttled, or the server failed or timed out; the request may work later."""


class APIUnavailableError(OperatorError):
    """The API server could not be reached, timed out, or its answer broke off."""


TRANSIENT = (APIUnavailableError, ServerBusyError)
"""Failures where trying the same request again soon is the remedy."""

_BY_REASON: dict[str, type[KubeAPIError]] = {
    "Unauthorized": UnauthorizedError,
    "Forbidden": ForbiddenError,
    "NotFound": NotFoundError,
    "Conflict": ConflictError,
    "AlreadyExists": ConflictError,
    "Gone": GoneError,
    "Expired": GoneError,
    "Invalid": InvalidObjectError,
    "TooManyRequests": ServerBusyError,
    "InternalError": ServerBusyError,
    "ServiceUnavailable": ServerBusyError,
    "ServerTimeout": ServerBusyError,
    "Timeout": ServerBusyError,
}
"""metav1.StatusReason values; a reason decides over the code (a watch's ERROR event carries both)."""

_BY_STATUS: dict[int, type[KubeAPIError]] = {
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    410: GoneError,
    422: InvalidObjectError,
    429: ServerBusyError,
    500: ServerBusyError,
    502: ServerBusyError,
    503: ServerBusyError,
    504: ServerBusyError,
}


def api_error(status: int, body: dict[str, Any] | str, what: str) -> KubeAPIError:
    """The most specific KubeAPIError for an answer's status and, when it is a `Status`, its reason."""
    reason = body.get("reason") if isinstance(body, dict) else None
    cls = _BY_REASON.get(reason or "") or _BY_STATUS.get(status, KubeAPIError)
    return cls(status, body, what)
