"""The proxy's decisions, pure: which request targets are accepted, the upstream URL, when to try again.

The upstream URL is built from parts: scheme and `host:port` from the routing table only, then the path and
query exactly as the client sent them (never decoded and re-encoded, so `%2F` and `%252e` arrive unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from yarl import URL

from llm_operator.gateway.errors import GatewayError

Failure = Literal["connect", "disconnect", "unavailable", "stale_key"]
"""Why an upstream attempt gave no answer to relay: could not connect; the connection closed (or was reset)
before any answer byte; the replica answered 503 (draining, or not ready); the replica of a protected
endpoint answered 401 to a token the gateway had accepted (it started before the key was rotated)."""
_VISIBLE = frozenset(range(0x21, 0x7F))


class BadRequest(GatewayError):
    """A request target the gateway does not forward (answered 400)."""

    status = 400
    error_type = "validation"


def request_target(raw_path: bytes, query: bytes) -> tuple[str, str]:
    """The raw path and query as text, once checked: the path must be absolute (origin-form, RFC 9112
    3.2.1) and both must be visible ASCII, as RFC 3986 requires of what is sent on the wire."""
    if not raw_path.startswith(b"/"):
        shown = raw_path[:100].decode("latin-1")
        raise BadRequest(f"the request target must be an absolute path starting with '/', got {shown!r}")
    if not _VISIBLE.issuperset(raw_path) or not _VISIBLE.issuperset(query):
        raise BadRequest("the request target must be percent-encoded ASCII")
    return raw_path.decode("ascii"), query.decode("ascii")


def upstream_url(address: str, raw_path: str, query: str) -> URL:
    """`http://<address><raw_path>?<query>` with `address` (`host:port`, `[v6]:port`) from the table and
    path and query used as they are, already percent-encoded."""
    host, _, port = address.rpartition(":")
    return URL.build(
        scheme="http", host=host, port=int(port), path=raw_path, query_string=query, encoded=True
    )


def candidates(addresses: Sequence[str], tried: Sequence[str]) -> tuple[str, ...]:
    """Replicas not tried yet for this request, or all of them once each has been tried."""
    return tuple(a for a in addresses if a not in tried) or tuple(addresses)


def should_retry(failure: Failure, *, tries: int, max_tries: int, untried: bool, reused: bool) -> bool:
    """Whether an attempt that gave the client nothing yet goes to a replica again (after `tries` attempts).

    - connect: the request never reached a replica, so any replica may be tried, the same one included;
    - disconnect: on a reused pooled connection the replica most likely closed it while idle, so any
      replica; on a fresh connection the request may have run, so only a replica not tried yet;
    - unavailable (503) and stale_key (401): only a replica not tried yet; the only replica's answer is
      passed through.
    """
    if tries >= max_tries:
        return False
    if failure == "connect":
        return True
    if failure == "disconnect":
        return reused or untried
    return untried
