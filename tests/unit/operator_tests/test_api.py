"""The pydantic models: parsing, defaults and helpers (the API server enforces the CEL rules)."""

from __future__ import annotations

from datetime import timedelta

import pydantic
import pytest

from llm_operator.api.v1alpha1 import LLMEndpointSpec, parse_duration, parse_endpoint
from llm_operator.errors import InvalidEndpointError
from tests.unit.operator_tests.factories import endpoint


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", timedelta(minutes=15)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("500ms", timedelta(seconds=0.5)),
        ("10s", timedelta(seconds=10)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


def test_defaults_match_the_crd() -> None:
    spec = endpoint().spec
    assert spec.scaling.min_replicas == 0
    assert spec.scaling.max_replicas == 1
    assert spec.scaling.scale_to_zero_after == "15m"
    assert spec.access == "protected"
    assert spec.model.dtype == "auto"
    assert spec.ranks == 1
    assert spec.gpus == 0


def test_ranks_follow_accelerator_unless_overridden() -> None:
    assert endpoint({"accelerator": {"type": "nvidia-l4", "count": 2}}).spec.ranks == 2
    assert (
        endpoint({"accelerator": {"type": "nvidia-l4", "count": 2}, "tensorParallelSize": 1}).spec.ranks == 1
    )


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(pydantic.ValidationError):
        LLMEndpointSpec.model_validate({"model": {"repository": "a/b"}, "replicas": 3})


def test_round_trip_by_alias() -> None:
    spec = endpoint(
        {
            "scaling": {"minReplicas": 1, "maxReplicas": 2},
            "model": {"repository": "a/b", "tokenSecretRef": {"name": "hf"}},
        }
    ).spec
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    assert dumped["scaling"]["minReplicas"] == 1
    assert dumped["model"]["tokenSecretRef"] == {"name": "hf", "key": "token"}
    assert LLMEndpointSpec.model_validate(dumped) == spec


def test_a_stored_endpoint_that_does_not_parse_is_an_invalid_endpoint() -> None:
    stored = endpoint().model_dump(by_alias=True, mode="json")
    assert parse_endpoint(stored) == endpoint()
    stored["spec"]["replicas"] = 3
    with pytest.raises(InvalidEndpointError, match="stored LLMEndpoint does not parse"):
        parse_endpoint(stored)
