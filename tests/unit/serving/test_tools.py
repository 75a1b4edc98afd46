"""Tool calling, pure parts: the plan and its checks, the call schema, the fallback prompt, the output parser
(whole and streamed over every chunking) and the OpenAI bodies and delta chunks built from it."""

from __future__ import annotations

import itertools
import json
import random
import re
from typing import Any

import jsonschema
import pytest

from llm_serving.config import Limits
from llm_serving.engine.request import FinishReason
from llm_serving.errors import ToolError
from llm_serving.openai_bodies import ToolChunks, chat_completion
from llm_serving.outputs import Generation, GenerationResult, TokenEvent, TokenInfo
from llm_serving.protocol.openai import ChatMessage, ChatRequest, NamedToolChoice, Tool
from llm_serving.protocol.tgi import GenerateParameters
from llm_serving.sampling.grammar import grammar_text
from llm_serving.sampling.params import GrammarSpec
from llm_serving.tools import (
    FALLBACK_TOOLS_PROMPT,
    MAX_PARALLEL_CALLS,
    MAX_TOOLS,
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    ToolCallParser,
    ToolEvent,
    call_schema,
    collect,
    new_call_id,
    parse_output,
    plan_tools,
    template_messages,
)
from llm_serving.validation import ValidRequest, validate_parameters

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["a", "b"],
        },
    },
}
NAMES = frozenset({"get_weather", "add"})


def tools(*items: dict[str, Any]) -> list[Tool]:
    return [Tool.model_validate(t) for t in items]


# --- the parser ---------------------------------------------------------------------------------------

# (generated text, expected content, expected [(name, arguments)])
CASES: list[tuple[str, str | None, list[tuple[str, str]]]] = [
    ("Hello world", "Hello world", []),
    ("", "", []),
    ("  leading and trailing  ", "  leading and trailing  ", []),
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        None,
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        'Let me check. <tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>\n'
        '<tool_call>{"name":"get_weather","parameters":{"city":"Oslo"}}</tool_call> Done.',
        "Let me check. Done.",
        [("add", '{"a":1,"b":2}'), ("get_weather", '{"city":"Oslo"}')],
    ),
    ('{"name": "add", "arguments": {"a": 1, "b": 2}}', None, [("add", '{"a": 1, "b": 2}')]),
    (
        '[{"name": "add", "arguments": {"a": 1, "b": 2}}, '
        '{"name": "get_weather", "arguments": {"city": "R"}}]',
        None,
        [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "R"}')],
    ),
    ('{"name": "add", "arguments": {"a": 1}} and then text', "and then text", [("add", '{"a": 1}')]),
    (
        '{"name": "add", "arguments": {}}\n{"name": "add", "arguments": {"a": 2}}',
        None,
        [("add", "{}"), ("add", '{"a": 2}')],
    ),
    # arguments as a JSON string, arguments first, no arguments, nested brackets inside strings
    ('{"name": "add", "arguments": "{\\"a\\": 3}"}', None, [("add", '{"a": 3}')]),
    ('  {"arguments": {"x": [1, {"y": "]}"}]}, "name": "add"}  ', None, [("add", '{"x": [1, {"y": "]}"}]}')]),
    ('{"name": "add"}', None, [("add", "{}")]),
    (
        '<tool_call>{"name": "add", "arguments": {"s": "a \\" } quote"}}</tool_call>',
        None,
        [("add", '{"s": "a \\" } quote"}')],
    ),
    # not calls: they stay content
    ('{"answer": 42}', '{"answer": 42}', []),
    ("[1, 2, 3]", "[1, 2, 3]", []),
    (
        '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
        [],
    ),
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ('<tool_call>{"name": 7}</tool_call>', '<tool_call>{"name": 7}</tool_call>', []),
    ('<tool_call>{"other": 1, "name": "add"}', '<tool_call>{"other": 1, "name": "add"}', []),
    ("a < b and <tool_ and <tool_call", "a < b and <tool_ and <tool_call", []),
    ("x <<tool_call>y", "x <<tool_call>y", []),
    ('text {"name": "add", "arguments": {}}', 'text {"name": "add", "arguments": {}}', []),
    ('{"name": "ad', '{"name": "ad', []),  # never confirmed: content
    ('{"name": "add", "argu', None, [("add", "{}")]),  # cut off after the name: a call
    # malformed after the name: the call stays as generated
    ('<tool_call>{"name": "add", "arguments": {"a": "}"', None, [("add", '{"a": "}"')]),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_c', None, [("add", '{"a": 1}')]),
    (
        '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_x> tail',
        "</tool_x> tail",
        [("add", '{"a": 1}')],
    ),
    ('{"name": "add" "arguments": 1}', None, [("add", "{}")]),
]


def _one_by_one(text: str, chunks: list[str]) -> list[ToolEvent]:
    parser = ToolCallParser(NAMES, new_id=lambda: "call_x")
    events: list[ToolEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def _summary(events: list[ToolEvent]) -> tuple[str | None, list[tuple[str, str]]]:
    parsed = collect(events)
    return parsed.content, [(c.name, c.arguments) for c in parsed.calls]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_parse_output(text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    parsed = parse_output(text, NAMES)
    assert (parsed.content, [(c.name, c.arguments) for c in parsed.calls]) == (content, calls)
    for call in parsed.calls:
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_streamed_parse_is_the_same_over_any_chunking(
    text: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    rng = random.Random(text)
    chunkings = [[text], list(text)]
    for _ in range(20):
        cuts = (
            sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
            if len(text) > 1
            else []
        )
        bounds = [0, *cuts, len(text)]
        chunkings.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    for chunks in chunkings:
        events = _one_by_one(text, chunks)
        assert _summary(events) == (content, calls), chunks
        starts = [e for e in events if isinstance(e, CallStart)]
        assert [s.index for s in starts] == list(range(len(calls)))
        for event in events:  # every fragment comes after its call's start
            if isinstance(event, ArgumentsDelta):
                assert event.index < len(starts)


def test_text_is_held_only_while_it_may_open_a_call() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("Hello") == [ContentDelta("Hello")]
    assert parser.feed(" there <tool") == [ContentDelta(" there ")]
    assert parser.feed("_ca") == []
    assert parser.feed("r") == [ContentDelta("<tool_car")]
    assert parser.feed(" <tool_call>") == [ContentDelta(" ")]
    assert parser.feed('{"name": "ad') == []
    start = parser.feed('d", "arguments": {"a"')
    assert isinstance(start[0], CallStart)
    assert start[0].name == "add"
    assert start[1:] == [ArgumentsDelta(0, '{"a"')]
    assert parser.feed(": 1}") == [ArgumentsDelta(0, ": 1}")]
    assert parser.feed("}\n</tool_call>") == []
    assert parser.feed(" bye") == [ContentDelta("bye")]
    assert parser.finish() == []


def test_unconfirmed_text_is_released_at_the_end() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("see <tool_call>") == [ContentDelta("see ")]
    assert parser.finish() == [ContentDelta("<tool_call>")]


def test_call_ids_are_openai_shaped_and_distinct() -> None:
    ids = {new_call_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)


# --- the plan -----------------------------------------------------------------------------------------


def test_plan_defaults_and_choices() -> None:
    assert plan_tools(None, None, None) is None
    assert plan_tools(tools(WEATHER), "none", None) is None
    auto = plan_tools(tools(WEATHER, ADD), None, None)
    assert auto is not None
    assert (auto.mode, auto.parallel, auto.names, auto.schema()) == ("auto", True, NAMES, None)
    required = plan_tools(tools(WEATHER, ADD), "required", False)
    assert required is not None
    assert (required.mode, required.parallel) == ("required", False)
    named = plan_tools(
        tools(WEATHER, ADD), NamedToolChoice.model_validate({"function": {"name": "add"}}), None
    )
    assert named is not None
    assert (named.mode, named.names, named.parallel) == ("named", frozenset({"add"}), False)
    no_params = plan_tools(tools({"type": "function", "function": {"name": "ping"}}), "required", None)
    assert no_params is not None
    assert no_params.tools[0]["function"]["parameters"] == {"type": "object", "properties": {}}


def _weather(name: str, **params: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **params}}


@pytest.mark.parametrize(
    ("given", "choice", "message"),
    [
        ([WEATHER], {"function": {"name": "nope"}}, "Tool error: Tool with name nope not found"),
        ([WEATHER, WEATHER], "auto", "Tool error: Tool name `get_weather` is given more than once"),
        ([_weather("f", parameters={"type": "array"})], "auto", "must be a JSON Schema of type `object`"),
        ([_weather("has space")], "auto", "must be 1 to 64 letters, digits, underscores or dashes"),
        ([_weather("x" * 65)], "auto", "must be 1 to 64"),
        ([_weather(f"f{i}") for i in range(MAX_TOOLS + 1)], "auto", f"up to {MAX_TOOLS} tools. Given: 129"),
        ([_weather("f", description="d" * 140_000)], "auto", "characters as JSON"),
        ([], "required", "`tool_choice` needs `tools`"),
        ([], {"function": {"name": "f"}}, "`tool_choice` needs `tools`"),
    ],
)
def test_plan_refusals(given: list[dict[str, Any]], choice: Any, message: str) -> None:
    body = ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "tools": given, "tool_choice": choice}
    )
    with pytest.raises(ToolError) as caught:
        plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    assert message in caught.value.text
    assert caught.value.status == 422
    assert caught.value.body()["error_type"] == "tool_error"


# --- the call schema ----------------------------------------------------------------------------------


def test_call_schema_accepts_exactly_calls_of_the_given_tools() -> None:
    one = call_schema([WEATHER], many=False)
    jsonschema.Draft202012Validator.check_schema(one)
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Paris"}}, one)
    for bad in (
        {"name": "add", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"unit": "celsius"}},
        {"name": "get_weather", "arguments": {"city": "P", "unit": "kelvin"}},
        {"name": "get_weather"},
        {"name": "get_weather", "arguments": {"city": "P"}, "extra": 1},
        {"name": "get_weather", "arguments": {"city": "P", "invented": 1}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, one)
    many = call_schema([WEATHER, ADD], many=True)
    jsonschema.validate([{"name": "add", "arguments": {"a": -4, "b": 3}}], many)
    jsonschema.validate([{"name": "add", "arguments": {"a": 1, "b": 2}}] * MAX_PARALLEL_CALLS, many)
    for bad_list in ([], [{"name": "add", "arguments": {"a": 1, "b": 10}}], [{"name": "x", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad_list, many)
    for schema in (one, many):  # llguidance compiles both
        assert grammar_text(GrammarSpec("json_schema", json.dumps(schema)))


def test_call_schema_keeps_each_tools_definitions_apart() -> None:
    def with_defs(name: str, inner: dict[str, Any]) -> dict[str, Any]:
        params = {
            "type": "object",
            "properties": {"p": {"$ref": "#/$defs/Inner"}},
            "required": ["p"],
            "$defs": {"Inner": inner},
        }
        return _weather(name, parameters=params)

    first = with_defs(
        "first", {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    )
    second = with_defs("second", {"type": "string", "enum": ["a", "b"]})
    schema = call_schema([first, second], many=False)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate({"name": "first", "arguments": {"p": {"x": 1}}}, schema)
    jsonschema.validate({"name": "second", "arguments": {"p": "a"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "second", "arguments": {"p": {"x": 1}}}, schema)
    assert grammar_text(GrammarSpec("json_schema", json.dumps(schema)))


# --- the fallback rendering ---------------------------------------------------------------------------


def test_fallback_puts_tools_in_a_system_instruction_and_calls_in_text() -> None:
    plan = plan_tools(tools(WEATHER), "auto", None)
    messages = [
        ChatMessage.model_validate(m)
        for m in (
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": "no rain"},
        )
    ]
    items, passed = template_messages(messages, plan, native=False)
    assert passed is None
    assert items[0] == {"role": "system", "content": FALLBACK_TOOLS_PROMPT.format(tools=json.dumps(WEATHER))}
    assert items[1] == {"role": "user", "content": "Weather in Paris?"}
    assert items[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert items[3] == {
        "role": "user",
        "content": "<tool_response>\n18 C, sunny\n</tool_response>\n"
        "<tool_response>\nno rain\n</tool_response>",
    }
    with_system, _ = template_messages(
        [ChatMessage(role="system", content="Be brief."), *messages], plan, False
    )
    assert with_system[0]["content"].startswith("Be brief.\n\nYou may call one or more functions")
    native, passed = template_messages(messages, plan, native=True)
    assert passed == [WEATHER]
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert native[2] == {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"}


# --- bodies and delta chunks --------------------------------------------------------------------------


def _result(text: str, reason: FinishReason) -> GenerationResult:
    params = validate_parameters(GenerateParameters(), Limits(), stream=False)
    request = ValidRequest(inputs="p", input_ids=(1, 2), max_new_tokens=9, params=params)
    events = [TokenEvent(0, TokenInfo(i, t, -0.5, False), (), None) for i, t in enumerate(text)]
    return GenerationResult(request, Generation(tokens=events, text=text, finish_reason=reason), (), 0.1)


def _accumulate(chunks: list[Any]) -> dict[str, Any]:
    """What the OpenAI SDK's stream accumulator does with the deltas."""
    content: str | None = None
    calls: dict[int, dict[str, Any]] = {}
    reason = None
    for chunk in chunks:
        (choice,) = chunk["choices"]
        delta = choice["delta"]
        if delta.get("content") is not None:
            content = (content or "") + delta["content"]
        for call in delta.get("tool_calls", []):
            slot = calls.setdefault(call["index"], {"function": {"name": "", "arguments": ""}})
            if "id" in call:
                slot["id"], slot["type"] = call["id"], call["type"]
            slot["function"]["name"] += call["function"].get("name", "")
            slot["function"]["arguments"] += call["function"].get("arguments", "")
        reason = choice["finish_reason"] or reason
    return {"content": content, "tool_calls": [calls[i] for i in sorted(calls)], "finish_reason": reason}


@pytest.mark.parametrize(
    ("text", "reason", "finish"),
    [
        (
            'Sure <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
            FinishReason.EOS_TOKEN,
            "tool_calls",
        ),
        (
            '[{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {}}]',
            FinishReason.STOP_SEQUENCE,
            "tool_calls",
        ),
        ('{"name": "add", "arguments": {"a": 1', FinishReason.LENGTH, "length"),
        ("just text <tool", FinishReason.EOS_TOKEN, "stop"),
    ],
)
def test_stream_chunks_accumulate_to_the_plain_answer(text: str, reason: FinishReason, finish: str) -> None:
    plan = plan_tools(tools(WEATHER, ADD), "auto", None)
    assert plan is not None
    result = _result(text, reason)
    body = chat_completion(result, "m", 1, want_logprobs=True, tools=plan)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == finish
    stream = ToolChunks(plan, "m", 1, want_logprobs=True)
    events = result.best.tokens
    chunks = [c for e in events[:-1] for c in stream.chunks(e)]
    chunks += stream.chunks(TokenEvent(0, events[-1].token, (), reason))
    got = _accumulate(chunks)
    message = choice["message"]
    assert got["finish_reason"] == finish
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert got["content"] == (message["content"] if "tool_calls" not in message else got["content"])
    assert "".join(_accumulate(chunks)["content"] or "").strip() == (message["content"] or "")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got["tool_calls"]] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])
    ]
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c["id"]) for c in got["tool_calls"])
    # every token's log-prob is sent once, on the chunk after it was held
    sent = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]]
    assert len(sent) == len(events)
