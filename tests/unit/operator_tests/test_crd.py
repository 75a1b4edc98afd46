"""The generated CRD: fresh, structural, with the rules, defaults and columns the API promises."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from llm_operator.api import crd as gen
from llm_operator.api.crd import DEFAULT_OUTPUT, SchemaError, crd, crd_yaml, structural


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.get("properties", {}).items():
            yield from walk(value, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from walk(node[key], f"{path}[{key}]")


def schema() -> dict[str, Any]:
    version = crd()["spec"]["versions"][0]
    result: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return result


def test_checked_in_file_is_fresh() -> None:
    assert DEFAULT_OUTPUT.read_text() == crd_yaml(), "run `python -m llm_operator.api.crd`"


def test_check_flag(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "crd.yaml"
    assert gen.main(["--output", str(target), "--check"]) == 1
    assert gen.main(["--output", str(target)]) == 0
    assert gen.main(["--output", str(target), "--check"]) == 0
    assert yaml.safe_load(target.read_text())["kind"] == "CustomResourceDefinition"


def test_schema_is_structural() -> None:
    for path, node in walk(schema()):
        assert not {"$ref", "anyOf", "allOf", "title", "nullable"} & set(node), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        assert not ("properties" in node and "additionalProperties" in node), path


def test_every_field_is_described() -> None:
    for path, node in walk(schema()["properties"]["spec"]):
        if path and not path.endswith("]"):
            assert node.get("description"), f"spec{path} has no description"


def test_names_and_subresources() -> None:
    spec = crd()["spec"]
    assert spec["names"]["shortNames"] == ["llme"]
    assert spec["names"]["plural"] == "llmendpoints"
    assert spec["versions"][0]["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = {c["name"]: c["jsonPath"] for c in crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Ready"] == ".status.ready"
    assert columns["URL"] == ".status.url"
    assert columns["GPUs"] == ".spec.accelerator.count"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_defaults() -> None:
    spec = schema()["properties"]["spec"]["properties"]
    scaling = spec["scaling"]
    assert scaling["default"] == {
        "minReplicas": 0,
        "maxReplicas": 1,
        "targetConcurrency": 8,
        "scaleToZeroAfter": "15m",
    }
    assert scaling["properties"]["minReplicas"]["default"] == 0
    assert scaling["properties"]["scaleToZeroAfter"]["default"] == "15m"
    assert spec["access"]["default"] == "protected"
    assert spec["generation"]["default"] == {}


def test_at_least_eight_cel_rules_each_naming_a_field() -> None:
    rules = [rule for _, node in walk(schema()) for rule in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 8
    for rule in rules:
        assert rule["message"].startswith(("spec.", "metadata.")), rule
        assert "rule" in rule


def test_transition_rules_guard_the_cache() -> None:
    cache = schema()["properties"]["spec"]["properties"]["cache"]
    rules = " ".join(r["rule"] for r in cache["x-kubernetes-validations"])
    assert "oldSelf.storageClassName" in rules
    assert "oldSelf.size" in rules


def test_structural_refuses_unions_and_unknown_keywords() -> None:
    with pytest.raises(SchemaError, match="union"):
        structural({"anyOf": [{"type": "string"}, {"type": "integer"}]})
    with pytest.raises(SchemaError, match="not support"):
        structural({"type": "string", "oneOf": []})
    with pytest.raises(SchemaError, match="no type"):
        structural({"description": "x"})


def test_optional_loses_null_and_keeps_outer_description() -> None:
    node = structural(
        {
            "anyOf": [{"type": "string", "description": "inner"}, {"type": "null"}],
            "default": None,
            "description": "outer",
            "title": "T",
        }
    )
    assert node == {"description": "outer", "type": "string"}
