"""Tool calling on `/v1/chat/completions` with SmolLM2 through the OpenAI SDK, huggingface_hub and raw HTTP;
and the chat prompt rendered with tools by the real tokenizer (SmolLM2's template renders no tools: the
fallback instruction) and by a template that renders them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from huggingface_hub import (
    ChatCompletionInputFunctionName,
    ChatCompletionInputToolChoiceClass,
    InferenceClient,
)
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageFunctionToolCall
from transformers import AutoTokenizer

from llm_devstack.models import tokenizer_dir
from llm_serving.protocol.openai import ChatMessage, Tool
from llm_serving.tools import TOOL_CALL_OPEN, fallback_instruction, plan_tools, render_chat
from tests.serving.conftest import Server, subprocess_server

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two small numbers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
        },
    },
}
TOOLS: list[Any] = [WEATHER, ADD]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK: list[Any] = [{"role": "user", "content": "What is the weather like in Paris today?"}]
CONVERSATION: list[Any] = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc", "content": "Sunny and 21 degrees, light wind"},
]

TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}"
    "{%- endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- elif message.tool_calls %}<|im_start|>assistant\n"
    "{%- for call in message.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A Hermes-style template that renders tools, calls and results (SmolLM2's renders none of them)."""


ROOM = ["--max-input-tokens", "1024", "--max-total-tokens", "1600"]
"""Room for the tools in the prompt, and for `MAX_PARALLEL_CALLS` calls."""


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """SmolLM2: a model that reads the tools."""
    log = tmp_path_factory.mktemp("tools-smollm2") / "server.log"
    with subprocess_server(["--model", str(smollm2_dir), *ROOM], log) as started:
        yield started


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny random Llama (SmolLM2's tokenizer and template): fast, and only constrained output calls."""
    log = tmp_path_factory.mktemp("tools-tiny") / "server.log"
    with subprocess_server(["--model", str(tiny_dir), *ROOM], log) as started:
        yield started


def sdk(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)


def _check_call(name: str, arguments: str, allowed: set[str]) -> None:
    assert name in allowed
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def _accumulate(stream: Any) -> tuple[str | None, list[tuple[str, str, str]], str | None]:
    """Tool-call deltas joined by index, as the OpenAI SDK's stream helpers join them."""
    content: str | None = None
    calls: dict[int, list[str]] = {}
    reason = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            content = (content or "") + choice.delta.content
        for call in choice.delta.tool_calls or []:
            slot = calls.setdefault(call.index, ["", "", ""])
            slot[0] = call.id or slot[0]
            if call.function is not None:
                slot[1] += call.function.name or ""
                slot[2] += call.function.arguments or ""
        reason = choice.finish_reason or reason
    return content, [(i, n, a) for i, n, a in (calls[k] for k in sorted(calls))], reason


# --- rendering ----------------------------------------------------------------------------------------


def _messages(raw: list[dict[str, Any]]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in raw]


def test_smollm2_template_gets_the_fallback_instruction_and_tool_results() -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    plan = plan_tools([Tool.model_validate(t) for t in TOOLS], "auto", None)
    assert plan is not None
    prompt = render_chat(tokenizer, _messages(CONVERSATION), plan)
    assert prompt.startswith("<|im_start|>system\n" + fallback_instruction(TOOLS) + "<|im_end|>\n")
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in prompt
    )
    assert "<|im_start|>user\n<tool_response>\nSunny and 21 degrees, light wind\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # no tools asked: SmolLM2's own system prompt, nothing about tools
    plain = render_chat(tokenizer, _messages(ASK), None)
    assert "SmolLM" in plain
    assert "tool" not in plain


def test_a_template_that_renders_tools_gets_them_natively() -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    tokenizer.chat_template = TOOLS_TEMPLATE
    plan = plan_tools([Tool.model_validate(t) for t in TOOLS], "required", None)
    prompt = render_chat(tokenizer, _messages(CONVERSATION), plan)
    assert prompt.startswith("<|im_start|>system\n# Tools\n<tools>")
    assert '"name": "add"' in prompt
    assert "You may call one or more functions" not in prompt
    assert f'{TOOL_CALL_OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"' in prompt
    assert "<tool_response>\nSunny and 21 degrees, light wind\n</tool_response>" in prompt


# --- constrained calls --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "parallel", "allowed"),
    [
        ("required", False, {"get_weather", "add"}),
        ("required", True, {"get_weather", "add"}),
        ({"type": "function", "function": {"name": "add"}}, True, {"add"}),
        ({"type": "function", "function": {"name": "get_weather"}}, False, {"get_weather"}),
    ],
)
def test_required_and_named_calls_through_the_openai_sdk(
    server: Server, choice: Any, parallel: bool, allowed: set[str]
) -> None:
    client = sdk(server)
    kwargs: dict[str, Any] = {
        "model": "tgi",
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": choice,
        "parallel_tool_calls": parallel,
        "max_tokens": 600,
        "temperature": 0,
    }
    done = client.chat.completions.create(**kwargs)
    (choice_out,) = done.choices
    assert choice_out.finish_reason == "tool_calls"
    calls = choice_out.message.tool_calls or []
    assert 1 <= len(calls) <= (8 if parallel and choice == "required" else 1)
    for call in calls:
        assert call.type == "function"
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
        _check_call(call.function.name, call.function.arguments, allowed)
    content, streamed, reason = _accumulate(client.chat.completions.create(**kwargs, stream=True))
    assert reason == "tool_calls"
    assert content is None
    assert [(n, a) for _, n, a in streamed] == [(c.function.name, c.function.arguments) for c in calls]
    assert all(i.startswith("call_") for i, _, _ in streamed)


def test_sampled_constrained_calls_all_validate(server: Server) -> None:
    """Six sampled answers in one batch (seeds, `required` with parallel calls and a named tool): every
    one parses into calls of the given tools whose arguments validate."""
    client = sdk(server)

    def ask(seed: int) -> Any:
        choice: Any = "required" if seed % 2 else {"type": "function", "function": {"name": "add"}}
        return client.chat.completions.create(
            model="tgi",
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=600,
            seed=seed,
            temperature=1.0,
        )

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    for seed, done in enumerate(answers):
        assert done.choices[0].finish_reason == "tool_calls"
        calls = done.choices[0].message.tool_calls or []
        assert calls
        for call in calls:
            _check_call(
                call.function.name, call.function.arguments, {"get_weather", "add"} if seed % 2 else {"add"}
            )


def test_smollm2_names_its_arguments_from_the_question(smol: Server) -> None:
    """A real model under the named-call constraint fills in the city asked about."""
    done = sdk(smol).chat.completions.create(
        model="tgi",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        temperature=0,
    )
    (call,) = done.choices[0].message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    _check_call(call.function.name, call.function.arguments, {"get_weather"})
    assert json.loads(call.function.arguments)["city"] == "Paris"
    assert done.choices[0].finish_reason == "tool_calls"


def test_sdk_stream_helper_builds_the_plain_message(server: Server) -> None:
    client = sdk(server)
    kwargs: dict[str, Any] = {
        "model": "tgi",
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 600,
        "temperature": 0,
    }
    done = client.chat.completions.create(**kwargs)
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    plain = [(c.function.name, c.function.arguments) for c in done.choices[0].message.tool_calls or []]
    streamed = [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls or []]
    assert streamed == plain
    assert final.choices[0].finish_reason == "tool_calls"


def test_huggingface_hub_chat_completion_with_tools(server: Server) -> None:
    client = InferenceClient(server.url, token=server.api_key)
    out = client.chat_completion(ASK, tools=TOOLS, tool_choice="required", max_tokens=600, temperature=0)
    assert out.choices[0].finish_reason == "tool_calls"
    calls = out.choices[0].message.tool_calls or []
    assert calls
    for call in calls:
        _check_call(call.function.name, str(call.function.arguments), {"get_weather", "add"})
    named = ChatCompletionInputToolChoiceClass(function=ChatCompletionInputFunctionName(name="add"))
    chunks = list(
        client.chat_completion(
            [{"role": "user", "content": "Add 2 and 3"}],
            tools=TOOLS,
            tool_choice=named,
            max_tokens=64,
            temperature=0,
            stream=True,
        )
    )
    deltas = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "add"
    assert deltas[0].id.startswith("call_")
    arguments = "".join(d.function.arguments or "" for d in deltas)
    _check_call("add", arguments, {"add"})
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# --- auto, none, multi-turn ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["smol", "server"])
def test_auto_and_none_answer_in_text_alike_streamed_or_not(
    which: str, request: pytest.FixtureRequest
) -> None:
    """Both models answer this in text: no call is made up; streamed and plain agree."""
    client = sdk(request.getfixturevalue(which))
    messages = [{"role": "user", "content": "Write one short sentence about the sea."}]
    for choice in ("auto", "none"):
        kwargs: dict[str, Any] = {
            "model": "tgi",
            "messages": messages,
            "tools": TOOLS,
            "tool_choice": choice,
            "max_tokens": 8,
            "temperature": 0,
        }
        done = client.chat.completions.create(**kwargs)
        message = done.choices[0].message
        assert not message.tool_calls
        assert message.content
        assert done.choices[0].finish_reason in ("stop", "length")
        content, calls, reason = _accumulate(client.chat.completions.create(**kwargs, stream=True))
        assert (content, calls, reason) == (message.content, [], done.choices[0].finish_reason)


def test_tool_results_reach_the_prompt_and_none_renders_no_tools(server: Server) -> None:
    with server.client() as http:
        body = {"model": "tgi", "messages": CONVERSATION, "tools": TOOLS}
        rendered = http.post("/chat_tokenize", json=body).json()["templated_text"]
        assert fallback_instruction(TOOLS) in rendered
        assert "<tool_response>\nSunny and 21 degrees, light wind\n</tool_response>" in rendered
        assert '"arguments": {"city": "Paris", "unit": "celsius"}' in rendered
        without = http.post("/chat_tokenize", json=body | {"tool_choice": "none"}).json()["templated_text"]
        assert "get_weather" in without  # the earlier call is history
        assert '"name": "add"' not in without
        answer = http.post("/v1/chat/completions", json=body | {"max_tokens": 24, "temperature": 0})
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["role"] == "assistant"


NOT_OBJECT = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
TOO_MANY = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]


@pytest.mark.parametrize(
    ("change", "needle", "error_type"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "Tool with name nope not found",
            "tool_error",
        ),
        ({"tools": [WEATHER, WEATHER]}, "is given more than once", "tool_error"),
        ({"tools": [NOT_OBJECT]}, "type `object`", "tool_error"),
        ({"tools": TOO_MANY}, "up to 128 tools", "tool_error"),
        ({"tools": None, "tool_choice": "required"}, "`tool_choice` needs `tools`", "tool_error"),
        ({"response_format": {"type": "json_object"}}, "Grammar and tools are mutually", "tool_error"),
        ({"tool_choice": "sometimes"}, "Failed to deserialize", None),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "Failed to deserialize", None),
    ],
)
def test_bad_tools_are_refused_before_any_answer(
    server: Server, change: dict[str, Any], needle: str, error_type: str | None
) -> None:
    body = {"model": "tgi", "messages": ASK, "tools": TOOLS, "max_tokens": 4} | change
    with server.client() as http:
        for stream in (False, True):
            answer = http.post("/v1/chat/completions", json=body | {"stream": stream})
            assert answer.status_code == 422
            assert needle in answer.text
            if error_type is not None:
                assert answer.json()["error_type"] == error_type


def test_plain_text_response_format_goes_with_tools(server: Server) -> None:
    """Only a grammar excludes tools: `response_format: text` asks for none."""
    body = {"model": "tgi", "messages": ASK, "tools": TOOLS, "max_tokens": 4, "tool_choice": "none"}
    with server.client() as http:
        answer = http.post("/v1/chat/completions", json=body | {"response_format": {"type": "text"}})
        assert answer.status_code == 200, answer.text


def test_tool_call_messages_with_null_content_are_accepted(server: Server) -> None:
    done = sdk(server).chat.completions.create(
        model="tgi",
        messages=CONVERSATION,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert done.choices[0].message.content
    assert done.choices[0].message.tool_calls is None
