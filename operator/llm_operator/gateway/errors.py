"""The gateway's refusals, each answered in TGI's error shape: `{"error": "...", "error_type": "..."}`.

Each refusal is a class with its status, error type and headers, defined next to the decision that raises it
(`auth`, `hold`, `limits`, `proxy`); the ones decided by the request's routing are here.
"""

from __future__ import annotations

import json

from llm_operator.contract import ENDPOINTS_PATH


class GatewayError(Exception):
    """A request the gateway answers itself: with `status`, `error_type` and `headers()`."""

    status = 503
    error_type = "unavailable"

    def headers(self) -> dict[str, str]:
        """Response headers that come with the refusal."""
        return {}


class BadRequest(GatewayError):
    """A request the gateway does not forward: its target, or a body it cannot read (answered 400)."""

    status = 400
    error_type = "validation"


class NoEndpoint(GatewayError):
    """A path that names no known endpoint (metrics and health are on the admin port)."""

    status = 404
    error_type = "not_found"

    def __init__(self, path: str) -> None:
        super().__init__(f"no endpoint for {path!r}: use {ENDPOINTS_PATH}/<namespace>/<name>/...")


class EndpointPaused(GatewayError):
    """An endpoint with `spec.paused`: refused, not held, and never woken."""

    status = 503
    error_type = "paused"

    def __init__(self, key: tuple[str, str]) -> None:
        super().__init__(f"endpoint {key[0]}/{key[1]} is paused (spec.paused): resume it to use it")


def error_body(message: str, error_type: str) -> bytes:
    return json.dumps({"error": message, "error_type": error_type}).encode()
