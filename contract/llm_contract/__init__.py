"""What the serving image and the operator's image must agree on: the serving container's port and
environment, and how a bearer token travels. Pure, with no dependencies, so both images install it (the
operator-side names live in `llm_operator.contract`, which re-exports these)."""

from __future__ import annotations

SERVING_PORT = 3000
"""Port the serving container listens on: the server's default and the port the operator renders."""
API_KEY_ENV = "API_KEY"
"""Env of a protected endpoint's serving container: the bearer token its server requires."""
GRACEFUL_SHUTDOWN_ENV = "GRACEFUL_SHUTDOWN_SECONDS"
"""Env of the serving container: how long the server drains open streams after SIGTERM."""


def bearer(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive), or None."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
