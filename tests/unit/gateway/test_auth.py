"""Access decisions: bearer tokens for protected endpoints, the cluster network for private ones."""

from __future__ import annotations

import pytest

from llm_operator.gateway import auth
from llm_operator.gateway.routing import Route

POLICY = auth.AccessPolicy.from_cidrs(("10.0.0.0/8", "127.0.0.0/8"))
TRUSTING = auth.AccessPolicy.from_cidrs(("10.0.0.0/8", "127.0.0.0/8"), trust_forwarded=True)
PROTECTED = Route("ml", "falcon", "protected", ("k", "token"), "s3cret")
PRIVATE = Route("ml", "falcon", "private")


def test_public_lets_everyone_in() -> None:
    auth.check(Route("ml", "falcon"), POLICY, "203.0.113.9", {})


def test_protected_needs_the_exact_bearer_token() -> None:
    auth.check(PROTECTED, POLICY, "203.0.113.9", {"authorization": "Bearer s3cret"})
    auth.check(PROTECTED, POLICY, "203.0.113.9", {"authorization": "bearer  s3cret "})
    for headers in (
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": "Basic s3cret"},
        {"authorization": "Bearer "},
        {"authorization": "Bearer s3cret2"},
    ):
        with pytest.raises(auth.Unauthorized) as caught:
            auth.check(PROTECTED, POLICY, "10.0.0.1", headers)
        assert caught.value.status == 401


def test_protected_without_a_readable_token_refuses_everyone() -> None:
    with pytest.raises(auth.Unauthorized):
        auth.check(
            Route("ml", "falcon", "protected", ("k", "token"), None),
            POLICY,
            "10.0.0.1",
            {"authorization": "Bearer anything"},
        )


def test_private_accepts_internal_peers_without_proxy_headers() -> None:
    auth.check(PRIVATE, POLICY, "10.1.2.3", {})
    auth.check(PRIVATE, POLICY, "::ffff:10.1.2.3", {})
    with pytest.raises(auth.OutsideCluster) as caught:
        auth.check(PRIVATE, POLICY, "203.0.113.9", {})
    assert caught.value.status == 403
    with pytest.raises(auth.OutsideCluster):
        auth.check(PRIVATE, POLICY, None, {})


def test_private_refuses_proxied_requests_unless_forwarded_is_trusted() -> None:
    via_ingress = {"x-forwarded-for": "10.4.4.4"}
    with pytest.raises(auth.OutsideCluster):
        auth.check(PRIVATE, POLICY, "10.0.0.7", via_ingress)
    auth.check(PRIVATE, TRUSTING, "10.0.0.7", via_ingress)
    for headers in (
        {"x-forwarded-for": "203.0.113.9, 10.4.4.4"},
        {"forwarded": 'for="[2001:db8::1]:443"'},
        {"x-real-ip": "198.51.100.1"},
        {"x-forwarded-for": ""},
    ):
        with pytest.raises(auth.OutsideCluster):
            auth.check(PRIVATE, TRUSTING, "10.0.0.7", headers)
    auth.check(PRIVATE, TRUSTING, "10.0.0.7", {"forwarded": "for=10.2.2.2;proto=http, for=127.0.0.1"})


def test_forwarded_for_parses_every_header() -> None:
    headers = {
        "forwarded": 'for=192.0.2.60;proto=http, for="[2001:db8::7]:4711"',
        "x-forwarded-for": "10.0.0.1",
    }
    assert auth.forwarded_for(headers) == ["192.0.2.60", "[2001:db8::7]", "10.0.0.1"]
    assert auth.forwarded_for({}) is None
