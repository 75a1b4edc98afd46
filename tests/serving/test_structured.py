"""Structured output: TGI `grammar` and OpenAI `response_format` through the real clients, and the engine's
per-row masks (constrained and free rows in one batch, preemption, refusal) with the tiny random Llama and
SmolLM2."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import torch
from huggingface_hub import (
    ChatCompletionInputJSONSchema,
    ChatCompletionInputResponseFormatJSONSchema,
    InferenceClient,
    TextGenerationInputGrammarType,
)
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field

from llm_serving.engine.engine import Engine
from llm_serving.engine.factory import EngineConfig, build_engine
from llm_serving.engine.request import Request
from llm_serving.loading import eos_ids, load, resolve
from llm_serving.outputs import FailureEvent, TokenEvent
from llm_serving.sampling.grammar import MAX_GRAMMAR_CHARS
from llm_serving.sampling.params import GrammarSpec, SamplingParams, StoppingParams
from tests.serving.conftest import Server, subprocess_server
from tests.serving.structured_cases import MAX_NEW_TOKENS, REGEXES, SCHEMAS, conforms

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
"""Servers on one torch thread: on cores shared with other test processes a second thread waiting for a busy
core slows every step many times over."""
PROMPT = "Answer:"
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
V = "Input validation error: "


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("structured-tiny") / "server.log"
    args = ["--model", str(tiny_dir), "--max-input-tokens", "256", "--max-total-tokens", "512"]
    with subprocess_server(args, log, env=ONE_THREAD) as server:
        yield server


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("structured-smollm2") / "server.log"
    args = ["--model", str(smollm2_dir), "--max-input-tokens", "256", "--max-total-tokens", "512"]
    with subprocess_server(args, log, env=ONE_THREAD) as server:
        yield server


def hub(server: Server) -> InferenceClient:
    return InferenceClient(base_url=server.url, api_key=server.api_key)


def sdk(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)


# --- the case set, every output valid -------------------------------------------------------------------


def _generate(client: InferenceClient, value: dict[str, Any], stream: bool, seed: int) -> tuple[str, str]:
    """(text, finish reason) of one `text_generation` call, streamed (sampled) or not (greedy)."""
    grammar = TextGenerationInputGrammarType(type=value["type"], value=value["value"])
    if not stream:
        out = client.text_generation(
            PROMPT,
            grammar=grammar,
            max_new_tokens=MAX_NEW_TOKENS,
            details=True,
            return_full_text=False,
        )
        assert out.details is not None
        return out.generated_text, str(out.details.finish_reason)
    text, reason = "", ""
    for chunk in client.text_generation(
        PROMPT,
        grammar=grammar,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=True,
        seed=seed,
        stream=True,
        details=True,
        return_full_text=False,
    ):
        if not chunk.token.special:
            text += chunk.token.text
        if chunk.details is not None:
            reason = str(chunk.details.finish_reason)
            assert chunk.generated_text == text
    return text, reason


def test_every_schema_and_regex_holds_through_text_generation(tiny: Server) -> None:
    """All 22 schemas and 12 regexes, greedy and sampled-streamed, batched together: every output is complete
    (ended by the grammar) and valid. Schemas go as objects when greedy, as JSON text when streamed."""
    client = hub(tiny)
    jobs: list[tuple[str, dict[str, Any], dict[str, Any] | None, str | None, bool]] = []
    for name, schema in SCHEMAS.items():
        jobs.append((name, {"type": "json", "value": schema}, schema, None, False))
        jobs.append((name, {"type": "json", "value": json.dumps(schema)}, schema, None, True))
    for name, regex in REGEXES.items():
        for stream in (False, True):
            jobs.append((name, {"type": "regex", "value": regex}, None, regex, stream))
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda j: _generate(client, j[1], j[4], seed=len(j[0])), jobs))
    failures = [
        (name, stream, reason, text)
        for (name, _, schema, regex, stream), (text, reason) in zip(jobs, results, strict=True)
        if reason != "eos_token" or not conforms(text, schema, regex)
    ]
    assert len(SCHEMAS) >= 20
    assert len(REGEXES) >= 10
    assert failures == []


def test_tgi_grammar_types_json_object_and_json_schema(tiny: Server) -> None:
    with tiny.client() as client:
        for grammar in (
            {"type": "json_object", "value": PERSON},
            {"type": "json_schema", "value": {"name": "person", "schema": PERSON}},
        ):
            body = {
                "inputs": PROMPT,
                "parameters": {"grammar": grammar, "max_new_tokens": 60, "details": True},
            }
            answer = client.post("/generate", json=body).json()
            assert answer["details"]["finish_reason"] == "eos_token", answer
            assert conforms(answer["generated_text"], PERSON), answer


def test_openai_routes_take_response_format_and_tgi_grammars(tiny: Server) -> None:
    """`/v1/completions` (OpenAI SDK, `response_format` in the body), plain and streamed; the chat route with
    TGI's `{"type": "json" | "regex", "value"}` shapes."""
    client = sdk(tiny)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    done = client.completions.create(
        model="tgi", prompt=PROMPT, max_tokens=60, temperature=0, extra_body={"response_format": fmt}
    )
    # Ended by the grammar, like an EOS (TGI 3.3 says "stop" here and "eos_token" when streamed).
    assert done.choices[0].finish_reason in ("stop", "eos_token")
    assert conforms(done.choices[0].text, PERSON), done
    chunks = list(
        client.completions.create(
            model="tgi",
            prompt=PROMPT,
            max_tokens=60,
            seed=5,
            stream=True,
            extra_body={"response_format": fmt},
        )
    )
    assert conforms("".join(c.choices[0].text for c in chunks), PERSON)
    assert str(chunks[-1].choices[0].finish_reason) == "eos_token"  # TGI streams the raw reason
    with tiny.client() as http:
        for response_format, schema, regex in (
            ({"type": "json", "value": PERSON}, PERSON, None),
            ({"type": "regex", "value": REGEXES["date"]}, None, REGEXES["date"]),
        ):
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60}
            answer = http.post(
                "/v1/chat/completions", json={**body, "response_format": response_format}
            ).json()
            assert answer["choices"][0]["finish_reason"] == "stop", answer
            assert conforms(answer["choices"][0]["message"]["content"], schema, regex), answer


def test_top_tokens_come_from_the_masked_distribution(tiny: Server) -> None:
    """`top_n_tokens` report the allowed tokens only, with log-probabilities of the masked distribution."""
    body = {
        "inputs": PROMPT,
        "parameters": {
            "grammar": {"type": "regex", "value": "[ab]{6}"},
            "max_new_tokens": 10,
            "top_n_tokens": 5,
            "details": True,
        },
    }
    with tiny.client() as client:
        answer = client.post("/generate", json=body).json()
    details = answer["details"]
    assert re.fullmatch("[ab]{6}", answer["generated_text"])
    for token, top in zip(details["tokens"], details["top_tokens"], strict=True):
        assert top
        assert all(re.fullmatch("[ab]+", t["text"]) for t in top), top
        assert top[0]["logprob"] == pytest.approx(token["logprob"])
        assert sum(2.718281828 ** t["logprob"] for t in top) <= 1.0 + 1e-4


def test_best_of_length_and_stop_sequences_with_a_grammar(tiny: Server) -> None:
    schema = SCHEMAS["event"]
    grammar = {"type": "json", "value": schema}
    with tiny.client() as client:
        best = client.post(
            "/generate",
            json={
                "inputs": PROMPT,
                "parameters": {"grammar": grammar, "best_of": 2, "do_sample": True, "details": True},
            },
        ).json()
        assert conforms(best["generated_text"], schema), best
        assert all(conforms(s["generated_text"], schema) for s in best["details"]["best_of_sequences"])
        cut = client.post(
            "/generate",
            json={"inputs": PROMPT, "parameters": {"grammar": grammar, "max_new_tokens": 3, "details": True}},
        ).json()
        assert cut["details"]["finish_reason"] == "length"  # a truncated JSON: allowed at length
        assert cut["generated_text"].startswith('{"title"'), cut
        stop = client.post(
            "/generate",
            json={"inputs": PROMPT, "parameters": {"grammar": grammar, "stop": ['"day"'], "details": True}},
        ).json()
        assert stop["details"]["finish_reason"] == "stop_sequence", stop
        assert '"day"' in stop["generated_text"]
        assert not conforms(stop["generated_text"], schema)


# --- SmolLM2 through the chat clients -------------------------------------------------------------------


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")  # `additionalProperties: false` in its schema
    name: str = Field(max_length=16)
    species: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)


def test_smollm2_chat_response_format_through_both_sdks(smollm2: Server) -> None:
    """huggingface_hub `chat_completion(response_format=...)` plain and streamed, the OpenAI SDK's
    `json_schema`, `json_object` and `parse()` with a pydantic model, run together."""
    pet_schema = Pet.model_json_schema()
    messages: list[dict[Any, Any]] = [{"role": "user", "content": "Describe a pet as JSON."}]
    hub_format = ChatCompletionInputResponseFormatJSONSchema(
        type="json_schema", json_schema=ChatCompletionInputJSONSchema(name="pet", schema=pet_schema)
    )

    def hub_plain() -> str:
        out = hub(smollm2).chat_completion(messages, response_format=hub_format, max_tokens=60)
        assert out.choices[0].finish_reason == "stop"
        return str(out.choices[0].message.content)

    def hub_stream() -> str:
        client = hub(smollm2)  # kept while the stream is read: a collected client closes it
        chunks = client.chat_completion(
            messages,
            response_format=hub_format,
            max_tokens=60,
            stream=True,
            seed=1,
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def openai_json_object() -> str:
        out = sdk(smollm2).chat.completions.create(
            model="tgi",
            messages=[{"role": "user", "content": 'Reply with the JSON object {"answer": "yes"}.'}],
            response_format={"type": "json_object"},
            max_tokens=40,
            temperature=0,
        )
        assert out.choices[0].finish_reason == "stop"
        return str(out.choices[0].message.content)

    def openai_parse() -> Pet:
        out = sdk(smollm2).chat.completions.parse(
            model="tgi",
            messages=[{"role": "user", "content": "Describe a pet as JSON."}],
            response_format=Pet,
            max_tokens=60,
            temperature=0,
        )
        parsed = out.choices[0].message.parsed
        assert isinstance(parsed, Pet)
        return parsed

    with ThreadPoolExecutor(4) as pool:
        plain, streamed, obj, pet = (
            pool.submit(hub_plain),
            pool.submit(hub_stream),
            pool.submit(openai_json_object),
            pool.submit(openai_parse),
        )
        assert conforms(plain.result(), pet_schema), plain.result()
        assert conforms(streamed.result(), pet_schema), streamed.result()
        assert isinstance(json.loads(obj.result()), dict), obj.result()
        assert pet.result().species in ("cat", "dog", "bird")


# --- bad grammars, the metric ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grammar", "names"),
    [
        ({"type": "regex", "value": "(a"}, "unclosed group"),
        ({"type": "regex", "value": "(?<=a)b"}, "look-around"),
        ({"type": "json", "value": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "strin"),
        ({"type": "json", "value": {"properties": {"a": {"type": "string", "format": "weird"}}}}, "weird"),
        ({"type": "json", "value": '{"properties": '}, "the JSON schema is not JSON"),
        ({"type": "json", "value": 5}, "grammar is not supported"),
        ({"type": "json_schema", "value": {"name": "x"}}, "`json_schema` needs a `schema`"),
        ({"type": "regex", "value": "a" * (MAX_GRAMMAR_CHARS + 1)}, f"longer than {MAX_GRAMMAR_CHARS}"),
    ],
)
def test_invalid_grammars_get_422_naming_the_problem(
    tiny: Server, grammar: dict[str, Any], names: str
) -> None:
    with tiny.client() as client:
        response = client.post("/generate", json={"inputs": PROMPT, "parameters": {"grammar": grammar}})
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"error", "error_type"}
    assert body["error_type"] == "validation"
    assert body["error"].startswith(
        V + ("grammar is not supported" if names.startswith("grammar") else "grammar")
    )
    assert names in body["error"], body


def test_invalid_response_format_on_the_chat_route(tiny: Server) -> None:
    bad = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "2"}},
    }
    with tiny.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "response_format": bad},
        )
    assert response.status_code == 422
    assert response.json()["error"].startswith(V + "grammar is not valid: ")


def _compile_count(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("tgi_request_grammar_compile_duration_count"):
            return float(line.split()[-1])
    raise AssertionError("no grammar compile metric")


def test_compile_time_is_a_metric_counted_once_per_grammar(tiny: Server) -> None:
    body = {"inputs": PROMPT, "parameters": {"grammar": {"type": "regex", "value": "metric-[0-9]"}}}
    with tiny.client() as client:
        before = _compile_count(client)
        for _ in range(2):
            assert client.post("/generate", json=body).status_code == 200
        assert _compile_count(client) == before + 1  # the second request hit the cache


# --- the engine: per-row masks in a shared batch ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path) -> Iterator[tuple[Any, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load(resolve(str(tiny_dir)), "float32")
    torch.set_num_threads(threads)


def _engine(loaded: tuple[Any, Any], **config: Any) -> Engine:
    model, tokenizer = loaded
    return build_engine(model, tokenizer, eos_ids(model, tokenizer), EngineConfig(**config))


def _run(engine: Engine, requests: list[Request]) -> tuple[dict[int, list[int]], dict[int, Any]]:
    """Add every request, step until done: each request's tokens and its final event."""
    for r in requests:
        engine.add(r)
    tokens: dict[int, list[int]] = {}
    final: dict[int, Any] = {}
    deadline = time.monotonic() + 60
    while engine.has_work or not final:
        events, _ = engine.step()
        for event in events:
            if isinstance(event, FailureEvent):
                final[event.request_id] = event
                continue
            assert isinstance(event, TokenEvent)
            tokens.setdefault(event.request_id, []).append(event.token.id)
            if event.finish_reason is not None:
                final[event.request_id] = event
        assert time.monotonic() < deadline
    return tokens, final


def _request(i: int, ids: tuple[int, ...], max_new: int, grammar: GrammarSpec | None = None) -> Request:
    return Request(
        i, ids, SamplingParams(grammar=grammar), StoppingParams(max_new_tokens=max_new), arrival=0.0
    )


def test_constrained_and_free_rows_share_a_batch_exactly(tiny_model: tuple[Any, Any]) -> None:
    """Free rows' greedy tokens are those they get alone; the constrained rows' too, and theirs are valid."""
    tokenizer = tiny_model[1]
    prompts = [tuple(tokenizer(t)["input_ids"]) for t in ("Once upon a time", "The capital of", "Answer:")]
    person = GrammarSpec("json_schema", json.dumps(SCHEMAS["person"]))
    phone = GrammarSpec("regex", REGEXES["phone"])
    batch = [
        _request(1, prompts[0], 16),
        _request(2, prompts[2], 40, person),
        _request(3, prompts[1], 16),
        _request(4, prompts[2], 40, phone),
    ]
    together, final = _run(_engine(tiny_model), batch)
    for r in batch:
        alone, _ = _run(
            _engine(tiny_model), [_request(r.id, r.prompt_ids, r.stopping.max_new_tokens, r.sampling.grammar)]
        )
        assert together[r.id] == alone[r.id], r.id
    assert conforms(tokenizer.decode(together[2], skip_special_tokens=True), SCHEMAS["person"])
    assert re.fullmatch(REGEXES["phone"], tokenizer.decode(together[4], skip_special_tokens=True))
    assert [final[i].finish_reason.value for i in (1, 2, 3, 4)] == [
        "length",
        "eos_token",
        "length",
        "eos_token",
    ]


def test_preemption_keeps_the_matcher(tiny_model: tuple[Any, Any]) -> None:
    """A constrained row preempted and recomputed goes on where its grammar was: the same tokens as alone."""
    tokenizer = tiny_model[1]
    ids = tuple(tokenizer("Letters:")["input_ids"])
    letters = GrammarSpec("regex", "[a-z]{200}")
    alone, _ = _run(
        _engine(tiny_model, block_size=4, max_batch_total_tokens=256), [_request(9, ids, 24, letters)]
    )
    crowd = [_request(i, (*ids, i), 24) for i in range(1, 4)] + [_request(9, ids, 24, letters)]
    engine = _engine(tiny_model, block_size=4, max_batch_total_tokens=48)
    together, _ = _run(engine, crowd)
    assert sum(r.preemptions for r in crowd) > 0, "nothing was preempted"
    assert together[9] == alone[9]
    assert re.fullmatch("[a-z]+", tokenizer.decode(together[9]))


def test_a_grammar_that_does_not_compile_in_the_engine_fails_only_its_request(
    tiny_model: tuple[Any, Any],
) -> None:
    """A spec set past validation is compiled by the engine; a bad one ends that request with a failure."""
    ids = tuple(tiny_model[1]("Hello")["input_ids"])
    tokens, final = _run(
        _engine(tiny_model), [_request(1, ids, 4, GrammarSpec("regex", "(unclosed")), _request(2, ids, 4)]
    )
    assert isinstance(final[1], FailureEvent)
    assert "unclosed group" in final[1].message
    assert len(tokens[2]) == 4
    assert 1 not in tokens
