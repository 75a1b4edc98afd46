"""The structured-output case set: JSON Schemas and regexes whose every output must validate, shared by the
structured-output tests and `bench.structured`.

Each is bounded (lengths, item counts, closed objects) so that the grammar ends the output within
`MAX_NEW_TOKENS` tokens whatever the model prefers, a random tiny model included.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

MAX_NEW_TOKENS = 200

_NAME = {"type": "string", "minLength": 1, "maxLength": 12}


def _closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """An object with exactly these properties allowed (all required unless `required` says)."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "person": _closed({"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "flag": _closed({"ok": {"type": "boolean"}}),
    "color_enum": _closed({"color": {"enum": ["red", "green", "blue"]}}),
    "const": _closed({"kind": {"const": "point"}, "x": {"type": "integer", "minimum": -9, "maximum": 9}}),
    "bounded_int": _closed({"count": {"type": "integer", "minimum": 10, "maximum": 99}}),
    "exclusive_bounds": _closed({"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5}}),
    "number_range": _closed({"score": {"type": "number", "minimum": 0, "maximum": 1}}),
    "negative_number": _closed({"t": {"type": "number", "minimum": -50, "maximum": -1}}),
    "short_string": _closed({"code": {"type": "string", "minLength": 2, "maxLength": 4}}),
    "pattern_string": _closed({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    "string_enum_array": _closed(
        {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}}
    ),
    "int_array": _closed(
        {"values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4}}
    ),
    "tuple": _closed(
        {
            "pair": {
                "type": "array",
                "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}],
                "items": False,
            }
        }
    ),
    "nested": _closed(
        {"user": _closed({"id": {"type": "integer", "minimum": 1, "maximum": 999}, "name": _NAME})}
    ),
    "deep_nested": _closed({"a": _closed({"b": _closed({"c": {"type": "boolean"}})})}),
    "array_of_objects": _closed(
        {
            "items": {
                "type": "array",
                "items": _closed({"sku": {"type": "string", "maxLength": 6}, "qty": {"enum": [1, 2, 3]}}),
                "minItems": 1,
                "maxItems": 2,
            }
        }
    ),
    "nullable": _closed({"note": {"type": ["string", "null"], "maxLength": 8}}),
    "any_of": _closed(
        {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none", "all"]}]}}
    ),
    "optional_fields": _closed(
        {"id": {"type": "integer", "minimum": 0, "maximum": 9}, "label": {"type": "string", "maxLength": 5}},
        required=["id"],
    ),
    "refs": {
        "$defs": {"point": _closed({"x": {"enum": [0, 1]}, "y": {"enum": [0, 1]}})},
        **_closed({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
    },
    "top_level_array": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 3},
    "event": _closed(
        {
            "title": {"type": "string", "maxLength": 10},
            "day": {"type": "integer", "minimum": 1, "maximum": 31},
            "month": {"enum": ["jan", "feb", "mar"]},
            "attendees": {"type": "array", "items": _NAME, "maxItems": 2},
            "online": {"type": "boolean"},
        }
    ),
}

REGEXES: dict[str, str] = {
    "digits": r"[0-9]{3}",
    "phone": r"[0-9]{3}-[0-9]{4}",
    "yes_no": r"(yes|no)",
    "date": r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "hex_color": r"#[0-9a-f]{6}",
    "word": r"[a-z]{1,8}",
    "ipv4": r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])",
    "email": r"[a-z]{1,8}@[a-z]{1,8}\.(com|org|net)",
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]",
    "answer": r"The answer is [0-9]{1,2}\.",
    "csv": r"[a-z]{1,4}(,[a-z]{1,4}){0,3}",
    "upper_code": r"[A-Z]{2}[0-9]{2}",
}


def conforms(text: str, schema: dict[str, Any] | None = None, regex: str | None = None) -> bool:
    """Whether `text` is JSON valid against `schema`, or fully matches `regex`."""
    if regex is not None:
        return re.fullmatch(regex, text) is not None
    try:
        jsonschema.validate(json.loads(text), schema or {})
    except (ValueError, jsonschema.ValidationError):
        return False
    return True
