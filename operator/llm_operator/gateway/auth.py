"""Who may call an endpoint: bearer tokens (against the hash in the endpoint's status) for `protected`, the
cluster network for `private`. Pure.

"Inside the cluster network" means: the TCP peer's address is in one of the configured internal CIDRs (the
pod and service ranges, `--internal-cidr`) **and** the request passed through no proxy. There is no default:
a private range is no proof of being inside (behind a LoadBalancer with `externalTrafficPolicy: Cluster` every
outside caller arrives from a node's address), so with none configured private endpoints refuse everyone.
A request that carries `Forwarded`, `X-Forwarded-For` or `X-Real-IP` came through a proxy (an Ingress
controller, a load balancer), so by default it counts as outside, whatever the peer is. With
`trust_forwarded` on, the addresses those headers name must all be internal too; turn it on only when every
proxy in front of the gateway rewrites those headers (as ingress-nginx does) rather than passing a client's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import llm_contract
from llm_operator import apikey
from llm_operator.gateway.errors import GatewayError
from llm_operator.gateway.headers import forwarded_for
from llm_operator.gateway.routing import Route

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


class KeyNotPublished(GatewayError):
    """A protected endpoint whose key hash the operator has not published (yet): no token can be checked."""

    error_type = "api_key_unavailable"

    def headers(self) -> dict[str, str]:
        return {"retry-after": "5"}


class OutsideCluster(AccessDenied):
    """A private endpoint called from outside the cluster network."""


@dataclass(frozen=True)
class AccessPolicy:
    """What counts as inside the cluster network."""

    internal: tuple[Network, ...]
    trust_forwarded: bool = False

    @classmethod
    def from_cidrs(cls, cidrs: Sequence[str] = (), trust_forwarded: bool = False) -> AccessPolicy:
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in cidrs), trust_forwarded)

    def outside_message(self, route: Route) -> str:
        """Why a private endpoint refused a caller from outside."""
        where = f"endpoint {route.namespace}/{route.name} is private to the cluster network"
        if self.internal:
            return where
        return (
            f"{where}, and this gateway has no internal network configured, so it admits nobody: set "
            "gateway.internalCIDRs (--internal-cidr) to the cluster's pod and service CIDRs"
        )

    def is_internal(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip().strip("[]"))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.internal)


def from_inside(policy: AccessPolicy, peer: str | None, headers: Mapping[str, str]) -> bool:
    """Whether the request comes from inside the cluster network (see the module's docstring)."""
    if peer is None or not policy.is_internal(peer):
        return False
    hops = forwarded_for(headers)
    if hops is None:
        return True
    return policy.trust_forwarded and bool(hops) and all(policy.is_internal(h) for h in hops)


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of the request's `Authorization: Bearer <token>` header."""
    return llm_contract.bearer(headers.get("authorization", ""))


def check(route: Route, policy: AccessPolicy, peer: str | None, headers: Mapping[str, str]) -> None:
    """Raise the AccessDenied that applies, or return when the caller may proceed."""
    if route.access == "private" and not from_inside(policy, peer, headers):
        raise OutsideCluster(policy.outside_message(route))
    if route.access != "protected":
        return
    given = bearer(headers)
    if given is None:
        raise Unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
    if not route.api_key_hash:
        raise KeyNotPublished(
            f"endpoint {route.namespace}/{route.name} is protected but the operator has not published its "
            "API key (the key Secret is missing or unreadable, or not reconciled yet): see its conditions"
        )
    if not apikey.matches(route.api_key_hash, given):
        raise Unauthorized("invalid bearer token")
