"""The proxy's decisions, pure: which request targets are accepted, the upstream URL, which replica an attempt
goes to, and whether a failed attempt is tried again or refused.

The upstream URL is built from parts: scheme and `host:port` from the routing table only, then the path and
query exactly as the client sent them (never decoded and re-encoded, so `%2F` and `%252e` arrive unchanged).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from yarl import URL

from llm_operator.gateway.errors import BadRequest, GatewayError
from llm_operator.gateway.routing import pick

Broken = Literal["connect", "disconnect", "timeout", "failed"]
"""How an attempt ended before any answer byte: could not connect; the connection closed (or was reset);
the replica sent nothing within the read timeout; any other client error (see `upstream.broken`)."""
Failure = Literal[Broken, "unavailable", "stale_key"]
"""Why an upstream attempt gave no answer to relay: it broke (`Broken`); the replica answered 503
(draining, or not ready); the replica of a protected endpoint answered 401 to a token the gateway had
accepted (it started before the key was rotated)."""
_VISIBLE = frozenset(range(0x21, 0x7F))


class UpstreamUnavailable(GatewayError):
    """No replica could be connected to, within the tries."""

    status = 502
    error_type = "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    """The replica sent nothing within the read timeout."""

    status = 504
    error_type = "upstream_timeout"


class UpstreamFailed(GatewayError):
    """The replica closed, reset or broke the connection before its answer began."""

    status = 502
    error_type = "upstream_failed"


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
      passed through;
    - timeout and failed: never (the request may be running).
    """
    if tries >= max_tries or failure in ("timeout", "failed"):
        return False
    if failure == "connect":
        return True
    if failure == "disconnect":
        return reused or untried
    return untried


def refused_answer(status: int, protected: bool) -> Failure | None:
    """Why a replica's answer is not relayed at once but may be tried elsewhere: a 503, or a 401 from a
    protected endpoint's replica; None for any other answer."""
    if status == 503:
        return "unavailable"
    if status == 401 and protected:
        return "stale_key"
    return None


def refusal(broken: Broken, error: str, read_timeout: float) -> GatewayError:
    """The answer to the client once a broken attempt is not tried again (`error` says what broke)."""
    if broken == "connect":
        return UpstreamUnavailable(f"no replica answered: {error}")
    if broken == "timeout":
        return UpstreamTimeout(f"the replica sent nothing for {read_timeout:g}s")
    return UpstreamFailed(f"the replica failed before answering: {error}")


@dataclass
class Tries:
    """The replicas one request was sent to, in order, and how many attempts it may make."""

    max_tries: int
    tried: list[str] = field(default_factory=list)

    def again(self, failure: Failure, addresses: Sequence[str], reused: bool) -> bool:
        """Whether to try again after the last attempt failed so (see `should_retry`); `addresses` are
        the ready replicas now, `reused` whether the attempt had a pooled connection."""
        return should_retry(
            failure,
            tries=len(self.tried),
            max_tries=self.max_tries,
            untried=any(a not in self.tried for a in addresses),
            reused=reused,
        )


class Replicas:
    """Requests this gateway has in flight per replica address, and the turn that breaks ties."""

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}
        self._turn = itertools.count()

    def choose(self, addresses: Sequence[str], tries: Tries) -> str:
        """The replica for a request's next attempt: untried ones first (`candidates`), then the least
        loaded (`routing.pick`); recorded in `tries`."""
        address = pick(candidates(addresses, tries.tried), self.in_flight, next(self._turn))
        tries.tried.append(address)
        return address

    @contextlib.contextmanager
    def sending(self, address: str) -> Iterator[None]:
        """Count one request in flight to `address` while the block runs."""
        self.in_flight[address] = self.in_flight.get(address, 0) + 1
        try:
            yield
        finally:
            self.in_flight[address] -= 1
            if not self.in_flight[address]:
                del self.in_flight[address]
