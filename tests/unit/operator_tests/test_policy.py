"""What the operator refuses to render: images its policy forbids, a key Secret the endpoint does not own."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from llm_operator.policy import (
    API_KEY_SECRET_NOT_OWNED,
    IMAGE_NOT_ALLOWED,
    image_refusal,
    key_secret_refusal,
    owned_key_secret,
)
from llm_operator.settings import Settings
from llm_operator.status import compute_status
from tests.unit.operator_tests.factories import endpoint

DEFAULT = "ghcr.io/llm-endpoints/llm-serving:0.1.0"
ALLOW = Settings(image=DEFAULT, image_policy="allow-list", allowed_images=("registry.corp/llm/*",))


@pytest.mark.parametrize(
    ("settings", "image", "allowed"),
    [
        (Settings(), "evil.example/miner:latest", True),  # `any`: the old behaviour, and the default
        (Settings(image_policy="default-only"), None, True),
        (Settings(image_policy="default-only"), DEFAULT, True),
        (Settings(image_policy="default-only"), "evil.example/miner:latest", False),
        (ALLOW, "registry.corp/llm/serving:1.2", True),
        (ALLOW, DEFAULT, True),
        (ALLOW, "registry.corp/other:1", False),
        (ALLOW, "evil.example/registry.corp/llm/x", False),
        (Settings(image_policy="allow-list"), "registry.corp/llm/serving:1.2", False),
    ],
)
def test_the_image_policy(settings: Settings, image: str | None, allowed: bool) -> None:
    refusal = image_refusal(endpoint({"image": image} if image else {}), settings)
    assert (refusal is None) == allowed
    if refusal:
        assert refusal.reason == IMAGE_NOT_ALLOWED
        assert f"spec.image {image} " in refusal.message
        assert "image policy" in refusal.message


def test_a_refused_endpoint_is_failed_with_the_reason() -> None:
    ep = endpoint({"image": "evil.example/miner:latest"})
    refusal = image_refusal(ep, Settings(image_policy="default-only"))
    status = compute_status(ep, None, [], [], datetime(2026, 1, 1, tzinfo=UTC), "http://gw/x", refusal)
    assert status.phase == "Failed"
    ready, degraded = status.condition("Ready"), status.condition("Degraded")
    assert ready
    assert (ready.status, ready.reason) == ("False", IMAGE_NOT_ALLOWED)
    assert degraded
    assert (degraded.status, degraded.reason) == ("True", IMAGE_NOT_ALLOWED)
    assert "only the default serving image" in ready.message


def secret(owners: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"name": "falcon-api-key", "ownerReferences": owners}, "data": {"token": "a25vd24="}}


def test_only_a_key_secret_the_endpoint_controls_is_its_own() -> None:
    ep = endpoint()  # uid-1
    mine = {
        "apiVersion": "llm-endpoints.io/v1alpha1",
        "kind": "LLMEndpoint",
        "uid": "uid-1",
        "controller": True,
    }
    assert owned_key_secret(secret([mine]), ep)
    assert key_secret_refusal(secret([mine]), ep) is None
    for planted in (
        secret([]),
        {"metadata": {"name": "falcon-api-key"}},
        secret([{**mine, "uid": "uid-2"}]),  # an endpoint of the same name, deleted and made again
        secret([{**mine, "controller": False}]),
    ):
        assert not owned_key_secret(planted, ep)
        refusal = key_secret_refusal(planted, ep)
        assert refusal
        assert refusal.reason == API_KEY_SECRET_NOT_OWNED
        assert "falcon-api-key exists but is not this endpoint's" in refusal.message
