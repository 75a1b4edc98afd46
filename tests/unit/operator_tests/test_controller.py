"""retry_delay maps each failure to a retry policy; the JSON log formatter keeps the endpoint's name."""

from __future__ import annotations

import json
import logging

from llm_operator.controller import MAX_DELAY, retry_delay
from llm_operator.errors import InvalidEndpointError
from llm_operator.handlers import may_have_drifted, only_ours
from llm_operator.kube import APIUnavailableError, ConflictError, InvalidObjectError, NotFoundError, api_error
from llm_operator.logs import JsonFormatter
from llm_operator.settings import Settings


def test_conflicts_retry_at_once_then_back_off() -> None:
    conflict = ConflictError(409, {"reason": "Conflict"}, "PATCH x")
    assert retry_delay(conflict, 1) == 0.0
    assert retry_delay(conflict, 5) == 0.5


def test_transient_errors_back_off_exponentially_up_to_a_cap() -> None:
    error = APIUnavailableError("down")
    delays = [retry_delay(error, n) for n in range(1, 12)]
    assert delays[:3] == [0.5, 1.0, 2.0]
    assert max(d for d in delays if d is not None) == MAX_DELAY


def test_permanent_errors_wait_for_a_change() -> None:
    assert retry_delay(InvalidEndpointError("bad"), 1) is None
    assert retry_delay(InvalidObjectError(422, {}, "x"), 1) is None


def test_api_error_classes() -> None:
    assert isinstance(api_error(404, {}, "x"), NotFoundError)
    assert isinstance(api_error(409, {}, "x"), ConflictError)
    error = api_error(422, {"reason": "Invalid", "message": "spec.x: bad"}, "PATCH /y")
    assert isinstance(error, InvalidObjectError)
    assert "spec.x: bad" in str(error)
    assert "PATCH /y" in str(error)


def test_json_log_line_has_the_endpoint() -> None:
    record = logging.getLogger("t").makeRecord(
        "t",
        logging.INFO,
        __file__,
        1,
        "reconciled",
        (),
        None,
        extra={"namespace": "ml", "endpoint": "falcon"},
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "reconciled"
    assert (line["namespace"], line["endpoint"], line["level"]) == ("ml", "falcon", "info")


def test_kopf_object_reference_becomes_namespace_and_object() -> None:
    ref = {"kind": "Deployment", "name": "falcon", "namespace": "ml"}
    record = logging.getLogger("kopf.objects").makeRecord(
        "kopf.objects",
        logging.WARNING,
        __file__,
        1,
        "x",
        (),
        None,
        extra={"k8s_ref": ref, "settings": object()},
    )
    line = json.loads(JsonFormatter().format(record))
    assert (line["namespace"], line["object"]) == ("ml", "Deployment/falcon")
    assert "settings" not in line


def test_echo_of_own_apply_is_ignored() -> None:
    ours = {"managedFields": [{"manager": "llm-operator", "operation": "Apply"}]}
    edited = {"managedFields": [*ours["managedFields"], {"manager": "kubectl-edit", "operation": "Update"}]}
    assert only_ours("ADDED", ours)
    assert only_ours("MODIFIED", ours)
    assert not only_ours("DELETED", ours)
    assert not only_ours(None, ours)
    assert not only_ours("MODIFIED", edited)
    assert not only_ours("MODIFIED", {})


def test_only_foreign_spec_or_metadata_writes_count_as_drift() -> None:
    ours = {"manager": "llm-operator", "operation": "Apply"}
    status = {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status"}
    scale = {"manager": "llm-autoscaler", "operation": "Update", "subresource": "scale"}
    replicas = {"manager": "llm-autoscaler", "operation": "Update"}  # spec.replicas on the Deployment
    edit = {"manager": "kubectl-edit", "operation": "Update"}
    assert not may_have_drifted("MODIFIED", "Deployment", {"managedFields": [ours, status, scale]})
    assert not may_have_drifted("MODIFIED", "Deployment", {"managedFields": [ours, status, replicas]})
    assert may_have_drifted("MODIFIED", "Deployment", {"managedFields": [ours, status, edit]})
    assert may_have_drifted("DELETED", "Service", {"managedFields": [ours]})
    assert may_have_drifted(None, "Service", {"managedFields": [ours]})
    assert not may_have_drifted("DELETED", "Pod", {"managedFields": [edit]})


def test_the_operator_flags_reach_its_settings() -> None:
    """The gateway's namespace and labels (the NetworkPolicy peer), the image policy and the egress ports."""
    from llm_operator.__main__ import parse_args, settings_from

    defaults = settings_from(parse_args(["--system-namespace=llm-system"]))
    assert defaults == Settings(system_namespace="llm-system")
    assert defaults.gateway_pods_namespace == "llm-system"
    args = [
        "--system-namespace=ops",
        "--gateway-namespace=edge",
        "--gateway-label=app.kubernetes.io/name=llm-gateway",
        "--gateway-label=app.kubernetes.io/instance=rel",
        "--image-policy=allow-list",
        "--allowed-image=registry.corp/llm/*",
        "--allowed-image=ghcr.io/llm-endpoints/*",
        "--serving-egress-port=443",
        "--serving-egress-port=3128",
    ]
    settings = settings_from(parse_args(args))
    assert settings.gateway_pods_namespace == "edge"
    assert settings.gateway_labels == {
        "app.kubernetes.io/name": "llm-gateway",
        "app.kubernetes.io/instance": "rel",
    }
    assert settings.image_policy == "allow-list"
    assert settings.allowed_images == ("registry.corp/llm/*", "ghcr.io/llm-endpoints/*")
    assert settings.serving_egress_ports == (443, 3128)
    assert settings_from(parse_args(["--serving-egress-port=0"])).serving_egress_ports == ()


def test_the_hub_endpoint_and_operator_labels_reach_its_settings() -> None:
    from llm_operator.__main__ import parse_args, settings_from

    defaults = settings_from(parse_args([]))
    assert (defaults.hf_endpoint, defaults.hub_url) == (None, "https://huggingface.co")
    assert defaults.operator_labels == {"app.kubernetes.io/name": "llm-operator"}
    args = ["--hf-endpoint=http://hub.internal:8080/", "--operator-label=app=op", "--operator-label=rel=a"]
    settings = settings_from(parse_args(args))
    assert settings.hub_url == "http://hub.internal:8080"
    assert settings.operator_labels == {"app": "op", "rel": "a"}


def test_next_pass_backs_off_on_the_hub_and_polls_loading_replicas() -> None:
    from llm_operator.controller import next_pass
    from llm_operator.reconcile import Outcome

    assert next_pass(Outcome(None, hub_retry=True), 1) == 0.5
    assert next_pass(Outcome(None, hub_retry=True), 4) == 4.0
    assert next_pass(Outcome(None, hub_retry=True, requeue_after=2.0), 20) == MAX_DELAY
    assert next_pass(Outcome(None, requeue_after=2.0), 0) == 2.0
    assert next_pass(Outcome(None), 0) is None


def test_the_resolve_annotation_triggers_a_full_pass() -> None:
    """A MODIFIED event of an observed generation is a status or metadata write, but one that asks for the
    revision to be resolved again is reconciled in full."""
    from llm_operator.contract import RESOLVE_ANNOTATION
    from llm_operator.revision import resolve_requested

    status = {"observedGeneration": 1, "model": {"resolveRequest": "a"}}
    assert resolve_requested({RESOLVE_ANNOTATION: "b"}, status)
    assert not resolve_requested({RESOLVE_ANNOTATION: "a"}, status)
