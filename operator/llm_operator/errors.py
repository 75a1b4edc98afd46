"""Typed failures of the operator; the controller maps each to retry-or-not in one place."""

from __future__ import annotations

from typing import Any


class OperatorError(Exception):
    """Base of every error the operator raises on purpose."""

    retryable = True
    """Whether reconciling again later may succeed without anyone changing anything."""


class InvalidEndpointError(OperatorError):
    """A stored LLMEndpoint does not parse (it bypassed the CRD schema, e.g. an older CRD version)."""

    retryable = False


class KubeAPIError(OperatorError):
    """The API server answered with an error status."""

    def __init__(self, status: int, body: dict[str, Any] | str, what: str) -> None:
        self.status = status
        self.body = body
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        message = body.get("message", "") if isinstance(body, dict) else body[:500]
        super().__init__(f"{what}: HTTP {status} {self.reason}: {message}".strip())


class NotFoundError(KubeAPIError):
    """404."""


class ConflictError(KubeAPIError):
    """409: a precondition or resourceVersion no longer holds, or the object exists."""


class ForbiddenError(KubeAPIError):
    """403: RBAC refuses the operator (fix the Role, then it retries)."""


class InvalidObjectError(KubeAPIError):
    """422: the API server refuses what the operator rendered; a bug or an admission policy."""

    retryable = False


class APIUnavailableError(OperatorError):
    """The API server could not be reached or timed out."""


def api_error(status: int, body: dict[str, Any] | str, what: str) -> KubeAPIError:
    """The most specific KubeAPIError for an HTTP status."""
    cls = {404: NotFoundError, 409: ConflictError, 403: ForbiddenError, 422: InvalidObjectError}.get(
        status, KubeAPIError
    )
    return cls(status, body, what)
