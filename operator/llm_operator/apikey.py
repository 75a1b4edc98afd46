"""The published form of a protected endpoint's API key: a salted SHA-256 in `status.apiKeyHash`. Pure.

The operator reads the key from its Secret and publishes `sha256:<salt>:<hex>` (salt: the endpoint's
metadata.uid; hex: SHA-256 of `<salt>:<key>`), so the gateway checks bearer tokens without reading Secrets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from llm_operator.api.v1alpha1 import LLMEndpoint
from llm_operator.contract import api_key_ref
from llm_operator.objects import Manifest
from llm_operator.policy import owned_key_secret

SCHEME = "sha256"


def _digest(salt: str, token: str) -> str:
    return hashlib.sha256(f"{salt}:{token}".encode()).hexdigest()


def key_hash(salt: str, token: str) -> str:
    """What the operator publishes for `token`."""
    return f"{SCHEME}:{salt}:{_digest(salt, token)}"


def matches(published: str | None, token: str) -> bool:
    """Whether `token` is the key `published` was made from (False when nothing is published)."""
    scheme, _, rest = (published or "").partition(":")
    salt, _, digest = rest.rpartition(":")
    if scheme != SCHEME or not salt or not digest:
        return False
    return hmac.compare_digest(_digest(salt, token).encode(), digest.encode())


def published_key(endpoint: LLMEndpoint, secret: Manifest | None) -> str | None:
    """`status.apiKeyHash` of a protected endpoint from its key Secret, or None (the gateway then admits
    nobody): no Secret, no such key, not base64, or a `<name>-api-key` the endpoint does not own."""
    ref = api_key_ref(endpoint)
    if ref is None or secret is None:
        return None
    if endpoint.spec.api_key_secret_ref is None and not owned_key_secret(secret, endpoint):
        return None
    try:
        token = base64.b64decode((secret.get("data") or {})[ref.key], validate=True).decode().strip()
    except (KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        return None
    return key_hash(endpoint.metadata.uid, token) if token else None
