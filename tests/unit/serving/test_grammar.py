"""Structured-output grammars without a model: the request shapes to `GrammarSpec`, compiling and caching
with SmolLM2's tokenizer, and the per-row token masks."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from llm_devstack.models import tokenizer_dir
from llm_serving.errors import ValidationError
from llm_serving.protocol.openai import ChatRequest
from llm_serving.protocol.tgi import Grammar
from llm_serving.sampling.grammar import MAX_GRAMMAR_CHARS, GrammarError, Grammars, grammar_text, grammars_for
from llm_serving.sampling.masks import RowMasks
from llm_serving.sampling.params import GrammarSpec
from llm_serving.validation import grammar_spec

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
SCHEMA_TEXT = json.dumps(SCHEMA)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(tokenizer_dir())


@pytest.mark.parametrize(
    ("grammar", "spec"),
    [
        ({"type": "json", "value": SCHEMA}, GrammarSpec("json_schema", SCHEMA_TEXT)),
        ({"type": "json", "value": SCHEMA_TEXT}, GrammarSpec("json_schema", SCHEMA_TEXT)),
        ({"type": "json_object", "value": SCHEMA}, GrammarSpec("json_schema", SCHEMA_TEXT)),
        ({"type": "json_object"}, GrammarSpec("json_object")),
        (
            {"type": "json_schema", "value": {"name": "n", "schema": SCHEMA}},
            GrammarSpec("json_schema", SCHEMA_TEXT),
        ),
        ({"type": "regex", "value": "[0-9]+"}, GrammarSpec("regex", "[0-9]+")),
    ],
)
def test_tgi_grammar_shapes(grammar: dict[str, Any], spec: GrammarSpec) -> None:
    assert grammar_spec(Grammar(**grammar)) == spec


@pytest.mark.parametrize(
    ("response_format", "spec"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, GrammarSpec("json_object")),
        (
            {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}},
            GrammarSpec("json_schema", SCHEMA_TEXT),
        ),
        ({"type": "json_schema", "json_schema": {"name": "n"}}, GrammarSpec("json_object")),
        ({"type": "json", "value": SCHEMA}, GrammarSpec("json_schema", SCHEMA_TEXT)),
        ({"type": "regex", "value": "a|b"}, GrammarSpec("regex", "a|b")),
    ],
)
def test_openai_response_formats(response_format: dict[str, Any], spec: GrammarSpec | None) -> None:
    body = ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "response_format": response_format}
    )
    grammar = body.parameters().grammar
    assert (None if grammar is None else grammar_spec(grammar)) == spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec("regex", "(a"), "unclosed group"),
        (GrammarSpec("regex", "a{3,1}"), "invalid repetition"),
        (GrammarSpec("json_schema", '{"type": "strin"}'), "strin"),
        (GrammarSpec("json_schema", '{"type": "string", "format": "weird"}'), "Unknown format: weird"),
        (GrammarSpec("json_schema", '{"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}}'), "x"),
        (GrammarSpec("json_schema", "[1]"), "must be an object or a boolean"),
        (GrammarSpec("json_schema", "{"), "not JSON"),
        (GrammarSpec("lark", 'start: missing | "x"'), "unknown name"),
        (GrammarSpec("regex", "a" * (MAX_GRAMMAR_CHARS + 1)), f"longer than {MAX_GRAMMAR_CHARS} characters"),
    ],
)
def test_bad_grammars_are_validation_errors_naming_the_problem(
    tokenizer: Any, spec: GrammarSpec, message: str
) -> None:
    with pytest.raises(GrammarError) as info:
        grammars_for(tokenizer).compile(spec)
    assert isinstance(info.value, ValidationError)
    assert info.value.status == 422
    assert info.value.text.startswith("Input validation error: grammar is not valid: ")
    assert message in info.value.text


def test_compile_caches_by_spec_with_an_lru_bound(tokenizer: Any) -> None:
    grammars = Grammars(tokenizer, cache_size=2)
    a, b, c = (GrammarSpec("regex", r) for r in ("a+", "b+", "c+"))
    assert grammars.compile(a) is not None  # compiled: its seconds
    assert grammars.compile(a) is None  # cached
    grammars.compile(b)
    grammars.compile(a)  # a is now the most recent
    grammars.compile(c)  # evicts b
    assert len(grammars) == 2
    assert grammars.compile(a) is None
    assert grammars.compile(b) is not None


def test_matchers_are_independent_copies(tokenizer: Any) -> None:
    grammars = grammars_for(tokenizer)
    assert grammars_for(tokenizer) is grammars
    spec = GrammarSpec("regex", "ab")
    first, second = grammars.matcher(spec), grammars.matcher(spec)
    a, b = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "b"))
    assert first.consume_token(a)
    assert first.consume_token(b)
    assert first.is_stopped()
    assert not second.is_stopped()
    assert not second.consume_token(b)  # still at the start: "b" is not allowed first


def test_json_is_written_on_one_line() -> None:
    """The compact separators (no free whitespace) are part of every JSON grammar unless a schema says."""
    text = grammar_text(GrammarSpec("json_schema", SCHEMA_TEXT))
    assert json.loads(text)["grammars"][0]["json_schema"]["x-guidance"]["whitespace_flexible"] is False


def test_row_masks_unpack_bits_and_forbid_the_rest() -> None:
    bits = torch.zeros((2, 2), dtype=torch.int32)
    bits[0, 0] = 0b101  # tokens 0 and 2
    bits[1, 1] = 1 << 1  # token 33
    masks = RowMasks(rows=(0, 2), bits=bits)
    scores = torch.zeros((3, 70))
    masks.apply(scores)
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(scores[1]).all()  # an unmasked row is untouched
    assert torch.isfinite(scores[2]).nonzero().flatten().tolist() == [33]
    assert masks.allowed(40).shape == (2, 40)  # a vocabulary narrower than the mask
