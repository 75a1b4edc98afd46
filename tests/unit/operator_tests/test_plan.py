"""What a reconcile pass decides from what it read: apply or only read, prune, scale, write, announce."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from llm_operator.api.v1alpha1 import LLMEndpoint
from llm_operator.apikey import key_hash
from llm_operator.contract import API_KEY_REF_ANNOTATION
from llm_operator.plan import (
    ApplyPlan,
    plan_apply,
    plan_update,
    reads_key_secret,
    reads_pods,
    unschedulable_pod,
)
from llm_operator.policy import API_KEY_SECRET_NOT_OWNED, IMAGE_NOT_ALLOWED
from llm_operator.settings import Settings
from tests.unit.operator_tests.factories import deployment, endpoint, pod

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SETTINGS = Settings()
STRICT = Settings(image_policy="default-only")


def _secret(token: str, owner: str | None = "uid-1", name: str = "falcon-api-key") -> dict[str, Any]:
    refs = [{"uid": owner, "controller": True}] if owner else []
    return {
        "metadata": {"name": name, "ownerReferences": refs},
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }


def _kinds(plan: ApplyPlan) -> list[str]:
    return [body["kind"] for body in plan.rendered]


def _template(plan: ApplyPlan) -> dict[str, Any]:
    (dep,) = [body for body in plan.rendered if body["kind"] == "Deployment"]
    template: dict[str, Any] = dep["spec"]["template"]
    return template


def test_a_new_spec_is_applied_without_pruning() -> None:
    plan = plan_apply(endpoint(), SETTINGS, None, children=True)
    assert plan.refused is None
    assert plan.key_hash is None
    assert "Deployment" in _kinds(plan)
    assert "Service" in _kinds(plan)
    assert not plan.read_first
    assert not plan.prune  # a first spec has nothing to prune


def test_a_changed_spec_is_applied_and_pruned_whatever_started_the_pass() -> None:
    changed = endpoint(generation=2, status={"observedGeneration": 1})
    for children in (True, False):
        plan = plan_apply(changed, SETTINGS, None, children=children)
        assert not plan.read_first
        assert plan.prune


def test_a_pod_event_with_an_unchanged_spec_only_reads_the_deployment() -> None:
    seen = endpoint(generation=3, status={"observedGeneration": 3})
    assert plan_apply(seen, SETTINGS, None, children=False).read_first
    assert not plan_apply(seen, SETTINGS, None, children=True).read_first


def test_a_refused_image_gets_nothing_applied_nor_a_key_secret() -> None:
    evil = endpoint({"image": "evil.example/miner:latest", "access": "protected"})
    assert not reads_key_secret(evil, STRICT)
    assert reads_key_secret(evil, SETTINGS)
    plan = plan_apply(evil, STRICT, None, children=True)
    assert plan.refused is not None
    assert plan.refused.reason == IMAGE_NOT_ALLOWED
    assert plan.rendered == ()
    assert plan.read_first
    assert plan.key_hash is None


def test_the_default_key_secret_must_be_the_endpoints_own() -> None:
    protected = endpoint({"access": "protected"})
    planted = plan_apply(protected, SETTINGS, _secret("s3cret", owner="someone-else"), children=True)
    assert planted.refused is not None
    assert planted.refused.reason == API_KEY_SECRET_NOT_OWNED
    assert planted.rendered == ()
    assert planted.key_hash is None
    own = plan_apply(protected, SETTINGS, _secret("s3cret"), children=True)
    assert own.refused is None
    assert own.key_hash == key_hash("uid-1", "s3cret")


def test_a_named_key_secret_is_used_without_an_owner() -> None:
    named = endpoint({"access": "protected", "apiKeySecretRef": {"name": "team-key", "key": "token"}})
    plan = plan_apply(named, SETTINGS, _secret("t0ken", owner=None, name="team-key"), children=True)
    assert plan.refused is None
    assert plan.key_hash == key_hash("uid-1", "t0ken")


def test_the_pod_template_follows_the_key_read_this_pass() -> None:
    stale = endpoint({"access": "protected"}, status={"apiKeyHash": key_hash("uid-1", "old")})
    old = plan_apply(stale, SETTINGS, _secret("old"), children=True)
    new = plan_apply(stale, SETTINGS, _secret("new"), children=True)
    annotation = [_template(p)["metadata"]["annotations"][API_KEY_REF_ANNOTATION] for p in (old, new)]
    assert annotation[0] != annotation[1]  # a rotated key rolls the pods


def test_pods_are_read_once_the_deployment_has_a_status() -> None:
    assert not reads_pods(None)
    assert not reads_pods({"metadata": {"name": "falcon"}, "spec": {"replicas": 1}})
    assert reads_pods(deployment(1, 0))


def test_the_unschedulable_pod_names_the_events_to_read() -> None:
    assert unschedulable_pod([pod("a"), pod("b")]) is None
    assert (
        unschedulable_pod(
            [pod("a"), pod("b", scheduled="Unschedulable"), pod("c", scheduled="Unschedulable")]
        )
        == "b"
    )


def _update(
    ep: LLMEndpoint, dep: dict[str, Any] | None, pods: list[dict[str, Any]], settings: Settings = SETTINGS
) -> Any:
    return plan_update(ep, plan_apply(ep, settings, None, children=True), dep, pods, [], NOW, settings)


def test_replicas_outside_the_bounds_are_corrected_and_the_status_shows_the_correction() -> None:
    bounded = endpoint({"scaling": {"minReplicas": 1, "maxReplicas": 2}})
    update = _update(bounded, deployment(5, 5), [pod(str(i), ready=True) for i in range(5)])
    assert update.scale_to == 2
    assert update.status.replicas == 2
    assert _update(bounded, deployment(2, 2), [pod(ready=True)]).scale_to is None  # the autoscaler's count


def test_a_wake_from_zero_sets_one_replica_and_is_acknowledged() -> None:
    requested = "2026-01-02T03:04:00.000001Z"
    waking = endpoint(status={"wakeRequestedAt": requested})
    update = _update(waking, deployment(0, 0), [])
    assert update.scale_to == 1
    assert update.status.wake_acknowledged == update.status.wake_requested_at is not None
    paused = endpoint({"paused": True}, status={"wakeRequestedAt": requested})
    assert _update(paused, deployment(0, 0), []).scale_to is None
    refused = endpoint({"image": "evil.example/miner:1"}, status={"wakeRequestedAt": requested})
    assert _update(refused, deployment(0, 0), [], STRICT).scale_to is None


def test_a_refused_endpoint_without_a_deployment_is_failed_and_scales_nothing() -> None:
    refused = endpoint({"image": "evil.example/miner:1"})
    update = _update(refused, None, [], STRICT)
    assert update.scale_to is None
    assert update.status.phase == "Failed"
    assert update.announcement is not None
    assert update.announcement.warning


def test_an_unchanged_status_is_neither_written_nor_announced() -> None:
    first = _update(endpoint(), deployment(1, 1), [pod(ready=True)])
    assert first.write_status
    assert first.announcement is not None
    stored = endpoint(status=first.status.model_dump(by_alias=True, exclude_none=True, mode="json"))
    again = _update(stored, deployment(1, 1), [pod(ready=True)])
    assert not again.write_status
    assert again.announcement is None
    assert again.status == first.status


BRANCH = {"model": {"repository": "org/m", "revision": "main"}}
RESOLVED = {"model": {"repository": "org/m", "revision": "main", "resolvedRevision": "a" * 40}}


def test_an_unresolved_branch_gets_no_deployment() -> None:
    from llm_operator.plan import hub_findings
    from llm_operator.revision import Refused, Resolution, Resolved, Unreachable

    wanted = Resolution("org/m", "main", None, None)
    down = hub_findings(wanted, Unreachable("timeout"), "http://hub")
    plan = plan_apply(endpoint(BRANCH), SETTINGS, None, children=True, hub=down)
    assert plan.rendered == ()
    assert plan.read_first
    assert plan.refused is None
    assert plan.resolving is not None
    assert plan.resolving.reason == "HubUnreachable"
    refused = hub_findings(wanted, Refused("RevisionNotFound", "Invalid rev id: main"), "http://hub")
    failed = plan_apply(endpoint(BRANCH), SETTINGS, None, children=True, hub=refused)
    assert failed.refused is not None
    assert (failed.refused.reason, failed.rendered) == ("RevisionNotFound", ())
    assert failed.refused.message.endswith("Hub: Invalid rev id: main")
    assert hub_findings(wanted, Resolved("a" * 40), "http://hub") == (None, None)
    assert hub_findings(None, None, "http://hub") == (None, None)

    pinned = plan_apply(endpoint(BRANCH, status=RESOLVED), SETTINGS, None, children=True)
    (dep,) = [body for body in pinned.rendered if body["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--revision") + 1] == "a" * 40


def test_a_hub_refusal_fails_the_endpoint_and_an_outage_shows_in_progressing() -> None:
    from llm_operator.plan import hub_findings
    from llm_operator.revision import Refused, Resolution, Unreachable

    wanted = Resolution("org/gated", "main", None, None)
    for answer, phase, reason in (
        (
            Refused("ModelAccessDenied", "Access to model org/gated is restricted."),
            "Failed",
            "ModelAccessDenied",
        ),
        (Unreachable("ClientConnectorError"), "Pending", "HubUnreachable"),
    ):
        applied = plan_apply(
            endpoint(BRANCH), SETTINGS, None, children=True, hub=hub_findings(wanted, answer, "http://hub")
        )
        update = plan_update(endpoint(BRANCH), applied, None, [], [], NOW, SETTINGS)
        assert update.status.phase == phase
        ready, progressing = update.status.condition("Ready"), update.status.condition("Progressing")
        assert ready is not None
        assert progressing is not None
        assert (ready.status, ready.reason) == ("False", reason)
        assert progressing.reason == reason
        assert "org/gated@main" in ready.message
