"""Who may call an endpoint: bearer tokens for `protected`, the cluster network for `private`. Pure.

"Inside the cluster network" means: the TCP peer's address is in one of the internal CIDRs (the pod and
service ranges; by default the private ranges and loopback) **and** the request passed through no proxy.
A request that carries `Forwarded`, `X-Forwarded-For` or `X-Real-IP` came through a proxy (an Ingress
controller, a load balancer), so by default it counts as outside, whatever the peer is. With
`trust_forwarded` on, the addresses those headers name must all be internal too; turn it on only when every
proxy in front of the gateway rewrites those headers (as ingress-nginx does) rather than passing a client's.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llm_operator.gateway.errors import GatewayError
from llm_operator.gateway.routing import Route

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_INTERNAL_CIDRS = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "::1/128",
    "fc00::/7",
)
FORWARDED_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


class AccessDenied(GatewayError):
    """The caller may not use the endpoint."""

    status = 403
    error_type = "forbidden"


class Unauthorized(AccessDenied):
    """A protected endpoint without the right bearer token."""

    status = 401
    error_type = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": "Bearer"}


class OutsideCluster(AccessDenied):
    """A private endpoint called from outside the cluster network."""


@dataclass(frozen=True)
class AccessPolicy:
    """What counts as inside the cluster network."""

    internal: tuple[Network, ...]
    trust_forwarded: bool = False

    @classmethod
    def from_cidrs(
        cls, cidrs: Sequence[str] = DEFAULT_INTERNAL_CIDRS, trust_forwarded: bool = False
    ) -> AccessPolicy:
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in cidrs), trust_forwarded)

    def is_internal(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip().strip("[]"))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.internal)


def forwarded_for(headers: Mapping[str, str]) -> list[str] | None:
    """Client addresses named by proxy headers, or None when no proxy header is present."""
    present = [name for name in FORWARDED_HEADERS if name in headers]
    if not present:
        return None
    found: list[str] = []
    for part in headers.get("forwarded", "").split(","):
        for pair in part.split(";"):
            key, _, value = pair.strip().partition("=")
            if key.lower() == "for" and value:
                host = value.strip('"')
                found.append(host.split("]")[0] + "]" if host.startswith("[") else host.split(":")[0])
    found += [a.strip() for a in headers.get("x-forwarded-for", "").split(",") if a.strip()]
    if real := headers.get("x-real-ip", "").strip():
        found.append(real)
    return found


def from_inside(policy: AccessPolicy, peer: str | None, headers: Mapping[str, str]) -> bool:
    """Whether the request comes from inside the cluster network (see the module's docstring)."""
    if peer is None or not policy.is_internal(peer):
        return False
    hops = forwarded_for(headers)
    if hops is None:
        return True
    return policy.trust_forwarded and bool(hops) and all(policy.is_internal(h) for h in hops)


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def check(route: Route, policy: AccessPolicy, peer: str | None, headers: Mapping[str, str]) -> None:
    """Raise the AccessDenied that applies, or return when the caller may proceed."""
    if route.access == "private" and not from_inside(policy, peer, headers):
        raise OutsideCluster(f"endpoint {route.namespace}/{route.name} is private to the cluster network")
    if route.access != "protected":
        return
    given = bearer(headers)
    if given is None:
        raise Unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
    if route.token is None or not hmac.compare_digest(given.encode(), route.token.encode()):
        raise Unauthorized("invalid bearer token")
