"""Pinned revisions: when spec.model's Hub revision is resolved to a commit, what the Hub's answer means, and
which revision the serving pods load. Pure; `hub.py` asks the Hub.

A branch or tag (anything but a 40-hex commit; unset means `main`) is resolved once, and the commit is
recorded in `status.model`; every replica of that spec loads the commit, so a push to the Hub cannot give
two replicas different weights. It is resolved again only when a person asks: by changing
spec.model.repository or .revision, or by setting the `llm-endpoints.io/resolve-revision` annotation to a
value other than the recorded `resolveRequest`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_contract import LOAD_FAILURE_REASONS
from llm_operator.api.common import SecretKeyRef
from llm_operator.api.v1alpha1 import LLMEndpoint, LLMEndpointStatus, ModelStatus
from llm_operator.contract import RESOLVE_ANNOTATION

DEFAULT_REVISION = "main"
"""The revision of a repository that names none (what `huggingface_hub` loads too)."""
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
HUB_UNREACHABLE = "HubUnreachable"
"""Reason (Progressing) while the Hub cannot be asked: the operator keeps retrying; never Failed."""
_ADVICE = {
    "ModelAccessDenied": "cannot be read without a valid token (it is private or gated, or the token is "
    "invalid): set spec.model.tokenSecretRef to a Secret with a token that can read the repository",
    "ModelNotFound": "the repository does not exist (or it is private and the token cannot read it): check "
    "spec.model.repository and spec.model.tokenSecretRef",
    "RevisionNotFound": "the revision does not exist: set spec.model.revision to a branch, tag or commit of "
    "the repository",
}
"""What to fix, by the reason a revision could not be resolved."""
assert set(_ADVICE) <= set(LOAD_FAILURE_REASONS)


def is_commit(revision: str) -> bool:
    """A full commit id: nothing to resolve."""
    return bool(_COMMIT.match(revision))


@dataclass(frozen=True)
class Resolution:
    """A revision to resolve on the Hub this pass."""

    repository: str
    revision: str
    token: SecretKeyRef | None
    """The Secret with the Hub token to resolve it with (spec.model.tokenSecretRef)."""
    request: str | None
    """The resolve-revision annotation's value, recorded with the commit."""


@dataclass(frozen=True)
class Resolved:
    """The Hub named the revision's commit."""

    commit: str


@dataclass(frozen=True)
class Refused:
    """The Hub refused: a person must fix the spec, the token or the repository (the endpoint is Failed)."""

    reason: str
    """One of `llm_contract.LOAD_FAILURE_REASONS`."""
    message: str
    """The Hub's own message."""


@dataclass(frozen=True)
class Unreachable:
    """The Hub could not be asked (network, timeout, 5xx, 429): retried with back-off."""

    message: str


HubAnswer = Resolved | Refused | Unreachable


def _spec_revision(endpoint: LLMEndpoint) -> str:
    return endpoint.spec.model.revision or DEFAULT_REVISION


def _matches(recorded: ModelStatus | None, endpoint: LLMEndpoint) -> bool:
    """Whether the recorded resolution is of the spec's repository and revision."""
    model = endpoint.spec.model
    return (
        recorded is not None
        and recorded.resolved_revision is not None
        and recorded.repository == model.repository
        and recorded.revision == _spec_revision(endpoint)
    )


def resolution_needed(endpoint: LLMEndpoint) -> Resolution | None:
    """The revision to resolve this pass, or None: not a Hub model, a commit already, or resolved for this
    spec and not asked again by the annotation."""
    model = endpoint.spec.model
    revision = _spec_revision(endpoint)
    if not model.repository or is_commit(revision):
        return None
    request = endpoint.metadata.annotations.get(RESOLVE_ANNOTATION)
    recorded = endpoint.status.model
    if _matches(recorded, endpoint) and recorded is not None and recorded.resolve_request == request:
        return None
    return Resolution(model.repository, revision, model.token_secret_ref, request)


def resolve_requested(annotations: Mapping[str, str], status: Mapping[str, Any]) -> bool:
    """Whether an endpoint as stored asks for its revision to be resolved again (the annotation's value
    differs from the one recorded with the commit); the watch handler queues a full pass for it."""
    if RESOLVE_ANNOTATION not in annotations:
        return False
    recorded = status.get("model")
    return isinstance(recorded, dict) and recorded.get("resolveRequest") != annotations[RESOLVE_ANNOTATION]


def recorded_model(endpoint: LLMEndpoint, answer: HubAnswer | None) -> ModelStatus | None:
    """`status.model` after this pass: the new commit when the Hub named one; the spec's commit when it is
    one; otherwise what was recorded (a refusal or an outage keeps the last commit known)."""
    model = endpoint.spec.model
    if not model.repository:
        return None
    revision = _spec_revision(endpoint)
    request = endpoint.metadata.annotations.get(RESOLVE_ANNOTATION)
    if isinstance(answer, Resolved):
        return ModelStatus(
            repository=model.repository,
            revision=revision,
            resolved_revision=answer.commit,
            resolve_request=request,
        )
    if is_commit(revision):
        return ModelStatus(
            repository=model.repository,
            revision=revision,
            resolved_revision=revision,
            resolve_request=request,
        )
    return endpoint.status.model


def with_model(endpoint: LLMEndpoint, model: ModelStatus | None) -> LLMEndpoint:
    """The endpoint as it is once `status.model` is recorded."""
    status: LLMEndpointStatus = endpoint.status.model_copy(update={"model": model})
    return endpoint.model_copy(update={"status": status})


def pinned_revision(endpoint: LLMEndpoint) -> str | None:
    """The revision the serving pods load: spec.model.revision when it is a commit, else the commit recorded
    for it (None for models not from the Hub, and while it is unresolved)."""
    model = endpoint.spec.model
    revision = _spec_revision(endpoint)
    if not model.repository:
        return None
    if is_commit(revision):
        return revision
    recorded = endpoint.status.model
    return recorded.resolved_revision if _matches(recorded, endpoint) and recorded else None


def unpinned(endpoint: LLMEndpoint) -> bool:
    """A Hub model whose revision has no commit yet: nothing is rendered for it (no Deployment may load a
    branch)."""
    return endpoint.spec.model.repository is not None and pinned_revision(endpoint) is None


MAX_HUB_MESSAGE = 1024


def hub_answer(status: int, headers: Mapping[str, str], body: bytes) -> HubAnswer:
    """What the Hub's answer to `GET /api/models/{repo}/revision/{revision}` means."""
    if status == 200:
        try:
            sha = json.loads(body).get("sha")
        except (ValueError, AttributeError):
            sha = None
        if isinstance(sha, str) and is_commit(sha):
            return Resolved(sha)
        return Unreachable("the Hub answered 200 without a commit id (sha)")
    message = _hub_message(status, headers, body)
    code = headers.get("X-Error-Code", "")
    if code == "GatedRepo" or status in (401, 403):  # the Hub answers 401 to anonymous private-repo reads
        return Refused("ModelAccessDenied", message)
    if code == "RevisionNotFound":
        return Refused("RevisionNotFound", message)
    if code == "RepoNotFound" or status == 404:
        return Refused("ModelNotFound", message)
    return Unreachable(message)


def _hub_message(status: int, headers: Mapping[str, str], body: bytes) -> str:
    """The Hub's `X-Error-Message`, else the `error` of its JSON body, else the status."""
    said = headers.get("X-Error-Message", "")
    if not said:
        try:
            error = json.loads(body).get("error")
        except (ValueError, AttributeError):
            error = None
        said = error if isinstance(error, str) else ""
    return (said.strip() or f"the Hub answered {status}")[:MAX_HUB_MESSAGE]


def hub_message(resolution: Resolution, answer: Refused | Unreachable, hub_url: str) -> str:
    """The condition message of a revision that could not be resolved."""
    what = f"{resolution.repository}@{resolution.revision}"
    if isinstance(answer, Refused):
        return f"{what}: {_ADVICE.get(answer.reason, 'the Hub refused it')}. Hub: {answer.message}"
    return f"cannot resolve {what} at {hub_url} (retrying): {answer.message}"
