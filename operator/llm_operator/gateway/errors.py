"""The gateway's refusals, each answered in TGI's error shape: `{"error": "...", "error_type": "..."}`."""

from __future__ import annotations

import json


class GatewayError(Exception):
    """A request the gateway answers itself: with `status`, `error_type` and `headers()`."""

    status = 503
    error_type = "unavailable"

    def headers(self) -> dict[str, str]:
        """Response headers that come with the refusal."""
        return {}


class ProxyError(GatewayError):
    """A failure decided where it happens, status and type included."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type = status, error_type


def error_body(message: str, error_type: str) -> bytes:
    return json.dumps({"error": message, "error_type": error_type}).encode()
