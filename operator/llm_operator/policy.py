"""What the operator refuses to act on for an endpoint, and why. Pure.

An endpoint that breaks a rule here gets nothing rendered or applied: its status says Failed with the
refusal's reason and message until its spec (or the cluster's Secret) changes.
"""

from __future__ import annotations

import fnmatch

from llm_operator.api.v1alpha1 import LLMEndpoint
from llm_operator.objects import Manifest
from llm_operator.settings import Settings
from llm_operator.status import Finding

IMAGE_NOT_ALLOWED = "ImageNotAllowed"
API_KEY_SECRET_NOT_OWNED = "APIKeySecretNotOwned"


def image_allowed(image: str, settings: Settings) -> bool:
    """Whether the operator's image policy lets an endpoint's pods run `image` (the default one always)."""
    if settings.image_policy == "any" or image == settings.image:
        return True
    if settings.image_policy == "default-only":
        return False
    return any(fnmatch.fnmatchcase(image, pattern) for pattern in settings.allowed_images)


def image_refusal(endpoint: LLMEndpoint, settings: Settings) -> Finding | None:
    """Why the endpoint's spec.image may not run under the operator's --image-policy, if it may not."""
    image = endpoint.spec.image
    if image is None or image_allowed(image, settings):
        return None
    if settings.image_policy == "default-only":
        rule = f"only the default serving image {settings.image} may run"
    else:
        rule = f"allowed: {settings.image}, {', '.join(settings.allowed_images) or 'no other'}"
    message = f"spec.image {image} is refused by the operator's image policy ({rule})"
    return Finding(IMAGE_NOT_ALLOWED, message)


def owned_key_secret(secret: Manifest, endpoint: LLMEndpoint) -> bool:
    """Whether the default `<name>-api-key` Secret is this endpoint's own: controlled by it (an owner
    reference with its uid), as the operator creates it. Anyone who may only create Secrets could plant the
    Secret before the endpoint exists and know its token, so another Secret of that name is never adopted."""
    owners = secret.get("metadata", {}).get("ownerReferences") or ()
    return any(ref.get("uid") == endpoint.metadata.uid and ref.get("controller") for ref in owners)


def key_secret_refusal(secret: Manifest, endpoint: LLMEndpoint) -> Finding | None:
    """Why the endpoint's default key Secret is not used, if it is not the endpoint's own."""
    if owned_key_secret(secret, endpoint):
        return None
    name = secret.get("metadata", {}).get("name", "")
    return Finding(
        API_KEY_SECRET_NOT_OWNED,
        f"Secret {name} exists but is not this endpoint's (no owner reference to it): the operator did not "
        "create it and does not use it, and the gateway refuses requests. Delete it so the operator creates "
        "a fresh one, or name a Secret you manage in spec.apiKeySecretRef",
    )
