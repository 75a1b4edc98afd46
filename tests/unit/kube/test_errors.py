"""One mapping from an API server's answer to a typed error: by the `Status` reason, else by the code."""

from __future__ import annotations

from typing import Any

import pytest

from llm_operator.errors import OperatorError
from llm_operator.kube import (
    TRANSIENT,
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


def status(code: int, reason: str, message: str = "") -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}  # fmt: skip


@pytest.mark.parametrize(
    ("code", "reason", "cls"),
    [
        (401, "Unauthorized", UnauthorizedError),
        (403, "Forbidden", ForbiddenError),
        (404, "NotFound", NotFoundError),
        (409, "Conflict", ConflictError),
        (409, "AlreadyExists", ConflictError),
        (410, "Expired", GoneError),
        (410, "Gone", GoneError),
        (422, "Invalid", InvalidObjectError),
        (429, "TooManyRequests", ServerBusyError),
        (500, "InternalError", ServerBusyError),
        (503, "ServiceUnavailable", ServerBusyError),
        (504, "Timeout", ServerBusyError),
        (400, "BadRequest", KubeAPIError),
    ],
)
def test_a_status_maps_to_its_class(code: int, reason: str, cls: type[KubeAPIError]) -> None:
    error = api_error(code, status(code, reason), "GET /x")
    assert type(error) is cls
    assert (error.status, error.reason) == (code, reason)


@pytest.mark.parametrize(
    ("code", "cls"),
    [(401, UnauthorizedError), (403, ForbiddenError), (404, NotFoundError), (410, GoneError),
     (422, InvalidObjectError), (502, ServerBusyError), (503, ServerBusyError), (418, KubeAPIError)],
)  # fmt: skip
def test_without_a_status_the_code_decides(code: int, cls: type[KubeAPIError]) -> None:
    """A proxy in front of the API server answers with text, not a Status."""
    error = api_error(code, "<html>upstream said no</html>", "GET /x")
    assert type(error) is cls
    assert "upstream said no" in str(error)


def test_the_reason_decides_over_the_code() -> None:
    """A watch's ERROR event carries a Status whose reason is the precise part (Expired: relist)."""
    assert isinstance(api_error(0, {"reason": "Expired"}, "WATCH /x"), GoneError)
    assert isinstance(api_error(500, {"reason": "Timeout"}, "GET /x"), ServerBusyError)


def test_the_message_names_the_request_and_the_servers_words() -> None:
    body = status(403, "Forbidden", 'pods is forbidden: User "gw" cannot list resource "pods"')
    text = str(api_error(403, body, "GET /api/v1/pods"))
    assert text.startswith("GET /api/v1/pods: HTTP 403 Forbidden: ")
    assert 'cannot list resource "pods"' in text


def test_only_invalid_objects_are_not_worth_retrying() -> None:
    codes = (401, 403, 404, 409, 410, 422, 429, 500, 503)
    assert [code for code in codes if not api_error(code, {}, "x").retryable] == [422]
    assert all(isinstance(api_error(code, {}, "x"), OperatorError) for code in codes)


def test_transient_failures_are_the_servers_not_the_requests() -> None:
    transient = [
        code
        for code in (403, 404, 410, 422, 429, 500, 502, 503, 504)
        if isinstance(api_error(code, {}, "x"), TRANSIENT)
    ]
    assert transient == [429, 500, 502, 503, 504]
