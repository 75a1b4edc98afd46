"""Access decisions: bearer tokens (against the operator's salted hash) for protected endpoints, the cluster
network for private ones."""

from __future__ import annotations

import hashlib

import pytest

from llm_operator.apikey import key_hash, matches
from llm_operator.gateway import auth
from llm_operator.gateway.routing import Route

POLICY = auth.AccessPolicy.from_cidrs(("10.0.0.0/8", "127.0.0.0/8"))
TRUSTING = auth.AccessPolicy.from_cidrs(("10.0.0.0/8", "127.0.0.0/8"), trust_forwarded=True)
UID = "6f1d2c3e-0000-4000-8000-000000000001"
PROTECTED = Route("ml", "falcon", "protected", key_hash(UID, "s3cret"))
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


def test_protected_without_a_published_hash_is_unavailable_not_a_wrong_token() -> None:
    for published in (None, ""):
        with pytest.raises(auth.KeyNotPublished) as caught:
            auth.check(
                Route("ml", "falcon", "protected", published),
                POLICY,
                "10.0.0.1",
                {"authorization": "Bearer s3cret"},
            )
        assert caught.value.status == 503
        assert "ml/falcon" in str(caught.value)
        assert caught.value.headers()["retry-after"]
    with pytest.raises(auth.Unauthorized):
        auth.check(Route("ml", "falcon", "protected"), POLICY, "10.0.0.1", {})


def test_protected_with_a_malformed_hash_refuses_everyone() -> None:
    for published in ("sha256::" + "0" * 64, "md5:x:y", "s3cret"):
        with pytest.raises(auth.Unauthorized):
            auth.check(
                Route("ml", "falcon", "protected", published),
                POLICY,
                "10.0.0.1",
                {"authorization": "Bearer s3cret"},
            )


def test_the_hash_is_salted_with_the_endpoint_uid() -> None:
    published = key_hash(UID, "s3cret")
    scheme, salt, digest = published.split(":")
    assert (scheme, salt) == ("sha256", UID)
    assert digest == hashlib.sha256(f"{UID}:s3cret".encode()).hexdigest()
    assert "s3cret" not in published
    assert key_hash("another-uid", "s3cret") != published  # one key, two endpoints: two hashes
    assert matches(published, "s3cret")
    assert not matches(published, "s3cret ")
    assert not matches(published.replace(UID, "another-uid"), "s3cret")  # the salt is part of the digest


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


def test_no_address_is_internal_unless_configured() -> None:
    """Behind an L4 LoadBalancer with externalTrafficPolicy: Cluster outside callers arrive from node
    addresses (private ranges): no range, loopback included, is inside by default."""
    unset = auth.AccessPolicy.from_cidrs()
    for peer in ("10.1.2.3", "192.168.1.4", "172.16.0.9", "100.64.0.1", "127.0.0.1", "::1", "fd00::1"):
        assert not unset.is_internal(peer)
        with pytest.raises(auth.OutsideCluster) as caught:
            auth.check(PRIVATE, unset, peer, {})
        assert caught.value.status == 403
        assert "gateway.internalCIDRs" in str(caught.value)
    with pytest.raises(auth.OutsideCluster) as configured:
        auth.check(PRIVATE, POLICY, "203.0.113.9", {})
    assert "gateway.internalCIDRs" not in str(configured.value)


def test_the_gateway_flags_name_the_internal_networks(caplog: pytest.LogCaptureFixture) -> None:
    from llm_operator.gateway.__main__ import parse_args, settings_from

    with caplog.at_level("WARNING", logger="llm_operator.gateway"):
        assert settings_from(parse_args([])).access.internal == ()
    assert "private endpoints refuse every caller" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="llm_operator.gateway"):
        policy = settings_from(parse_args(["--internal-cidr=10.244.0.0/16"])).access
    assert policy.is_internal("10.244.3.4")
    assert not policy.is_internal("10.96.0.1")
    assert not caplog.text
