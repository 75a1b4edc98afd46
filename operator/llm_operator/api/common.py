"""Building blocks of the API that are not specific to LLMEndpoint: the model base, quantities, times,
durations, and the Kubernetes-shaped references, env vars and tolerations."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, WithJsonSchema
from pydantic.alias_generators import to_camel

from llm_operator.objects import rfc3339, rfc3339_micro

DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

Quantity = Annotated[int | str, WithJsonSchema({"x-kubernetes-int-or-string": True, "maxLength": 64})]
"""A Kubernetes resource quantity such as `16Gi`, `500m` or `4`."""

Timestamp = Annotated[
    datetime,
    PlainSerializer(rfc3339, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""A Kubernetes Time: RFC 3339 in whole seconds, UTC."""

MicroTimestamp = Annotated[
    datetime,
    PlainSerializer(rfc3339_micro, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""A Timestamp with microseconds (two requests in one second stay apart)."""


def parse_duration(text: str) -> timedelta:
    """`1h30m`, `15m`, `500ms` -> timedelta (the schema's pattern has already been checked)."""
    return timedelta(seconds=sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text)))


def rules(*checks: dict[str, str]) -> dict[str, Any]:
    """CEL validation rules for a model's json_schema_extra."""
    return {"x-kubernetes-validations": list(checks)}


class Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )


class SecretKeyRef(Model):
    """A key of a Secret in the endpoint's namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the Secret."""
    key: str = Field(default="token", min_length=1, max_length=253)
    """Key inside the Secret."""


class KeyRef(Model):
    """A key of a Secret or ConfigMap in the endpoint's namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the object."""
    key: str = Field(min_length=1, max_length=253)
    """Key inside it."""
    optional: bool | None = None
    """Start even when the key is missing."""


class EnvVarSource(Model):
    """A value read from a Secret, a ConfigMap or the pod itself."""

    secret_key_ref: KeyRef | None = None
    """A key of a Secret."""
    config_map_key_ref: KeyRef | None = None
    """A key of a ConfigMap."""
    field_ref: dict[str, str] | None = Field(default=None, max_length=2)
    """A field of the pod, e.g. `{fieldPath: metadata.name}`."""


class EnvVar(Model):
    """An environment variable of the serving container."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    """Variable name."""
    value: str | None = Field(default=None, max_length=32768)
    """Literal value."""
    value_from: EnvVarSource | None = None
    """Source of the value."""


class Toleration(Model):
    """A pod toleration, as in core/v1."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            {
                "rule": "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "message": "spec.tolerations[].value must be empty when operator is Exists",
                "fieldPath": ".value",
            },
        )
    )

    key: str | None = Field(default=None, max_length=317)
    """Taint key; empty with operator Exists tolerates everything."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists or Equal."""
    value: str | None = Field(default=None, max_length=63)
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""
