"""Asks the Hub (or the mirror `--hf-endpoint` names) which commit a revision is: the I/O of `revision.py`.

One bounded `GET {hub}/api/models/{repo}/revision/{revision}` with the endpoint's Hub token, if it has one.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import quote

import aiohttp

from llm_operator.kube import Kube, NotFoundError
from llm_operator.revision import HubAnswer, Resolution, Unreachable, hub_answer

TIMEOUT = aiohttp.ClientTimeout(total=10, connect=5)
MAX_BODY_BYTES = 4 * 1024 * 1024
"""The revision API's answer lists the repository's files; a larger answer is not read."""


def revision_url(hub_url: str, repository: str, revision: str) -> str:
    """The revision API's URL (the revision is one path segment, `/` escaped, as huggingface_hub does)."""
    return f"{hub_url.rstrip('/')}/api/models/{repository}/revision/{quote(revision, safe='')}"


async def resolve(
    session: aiohttp.ClientSession, hub_url: str, resolution: Resolution, token: str | None
) -> HubAnswer:
    """The Hub's answer for the resolution; transport failures and timeouts are `Unreachable`."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = revision_url(hub_url, resolution.repository, resolution.revision)
    try:
        async with session.get(url, headers=headers, timeout=TIMEOUT, allow_redirects=True) as answer:
            body = await answer.content.read(MAX_BODY_BYTES + 1)
            if len(body) > MAX_BODY_BYTES and answer.status == 200:
                return Unreachable(f"the Hub's answer is larger than {MAX_BODY_BYTES} bytes")
            return hub_answer(answer.status, answer.headers, body)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        return Unreachable(f"{type(error).__name__}: {error}".rstrip(": "))


async def read_token(kube: Kube, namespace: str, resolution: Resolution) -> str | None:
    """The Hub token from the Secret spec.model.tokenSecretRef names; None when there is none, or it or its
    key is missing (the Hub then answers as to anyone, and says so)."""
    ref = resolution.token
    if ref is None:
        return None
    try:
        secret = await kube.get("v1", "Secret", namespace, ref.name)
    except NotFoundError:
        return None
    value = (secret.get("data") or {}).get(ref.key)
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True).decode().strip() or None
    except (binascii.Error, UnicodeDecodeError):
        return None
