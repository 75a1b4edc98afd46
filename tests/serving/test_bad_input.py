"""Malformed and out-of-range requests: each gets TGI's status and shape, and the server keeps serving."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.serving.conftest import API_KEY, Server

V = "Input validation error: "
BAD_JSON = "Failed to parse the request body as JSON: "
JSON_ROUTES = ("/", "/generate", "/generate_stream", "/tokenize", "/v1/chat/completions", "/v1/completions")
DEEP = b'{"stream":true,"inputs":"x","x":' + b"[" * 200_000 + b"]" * 200_000 + b"}"


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: Any  # a dict/list is sent as JSON; bytes are sent raw
    status: int
    kind: str  # json: TGI validation error; unauthorized; plain: axum-style text; empty; sse; sse_openai
    message: str = ""
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    error_type: str = "validation"  # of a json case


def gen(**parameters: Any) -> dict[str, Any]:
    return {"inputs": "Hello there", "parameters": parameters}


CASES = [
    Case(
        "truncated json",
        "/generate",
        b'{"inputs": ',
        400,
        "plain",
        "Failed to parse the request body as JSON",
    ),
    Case("not json", "/generate", b"hello", 400, "plain", "Failed to parse the request body as JSON"),
    Case(
        "NaN literal",
        "/generate",
        b'{"inputs":"x","parameters":{"temperature":NaN}}',
        400,
        "plain",
        "Failed to parse the request body as JSON",
    ),
    Case("invalid utf-8", "/generate", b'{"inputs":"\xff\xfe"}', 400, "plain", "Failed to parse"),
    Case("body is a list", "/generate", [1, 2], 422, "plain", "Failed to deserialize the JSON body"),
    Case("missing inputs", "/generate", {}, 422, "plain", "Failed to deserialize the JSON body"),
    Case("inputs not a string", "/generate", {"inputs": 5}, 422, "plain", "Failed to deserialize"),
    Case(
        "parameters not an object",
        "/generate",
        {"inputs": "x", "parameters": "p"},
        422,
        "plain",
        "Failed to deserialize",
    ),
    Case(
        "max_new_tokens as string",
        "/generate",
        gen(max_new_tokens="10"),
        422,
        "plain",
        "Failed to deserialize",
    ),
    Case(
        "negative max_new_tokens", "/generate", gen(max_new_tokens=-1), 422, "plain", "Failed to deserialize"
    ),
    Case("do_sample not bool", "/generate", gen(do_sample="yes"), 422, "plain", "Failed to deserialize"),
    Case("stop not a list", "/generate", gen(stop=5), 422, "plain", "Failed to deserialize"),
    Case("empty inputs", "/generate", {"inputs": ""}, 422, "json", V + "`inputs` cannot be empty"),
    Case(
        "temperature 0",
        "/generate",
        gen(temperature=0),
        422,
        "json",
        V + "`temperature` must be strictly positive",
    ),
    Case(
        "negative temperature",
        "/",
        gen(temperature=-1.0),
        422,
        "json",
        V + "`temperature` must be strictly positive",
    ),
    Case(
        "repetition_penalty 0",
        "/generate",
        gen(repetition_penalty=0.0),
        422,
        "json",
        V + "`repetition_penalty` must be strictly positive",
    ),
    Case(
        "frequency_penalty 3",
        "/generate",
        gen(frequency_penalty=3.0),
        422,
        "json",
        V + "`frequency_penalty` must be >= -2.0 and <= 2.0",
    ),
    Case("top_p 1.0", "/generate", gen(top_p=1.0), 422, "json", V + "`top_p` must be > 0.0 and < 1.0"),
    Case("top_p 0", "/generate", gen(top_p=0.0), 422, "json", V + "`top_p` must be > 0.0 and < 1.0"),
    Case(
        "typical_p 1.5",
        "/generate",
        gen(typical_p=1.5),
        422,
        "json",
        V + "`typical_p` must be > 0.0 and < 1.0",
    ),
    Case("top_k 0", "/generate", gen(top_k=0), 422, "json", V + "`top_k` must be strictly positive"),
    Case("top_k negative", "/generate", gen(top_k=-5), 422, "json", V + "`top_k` must be strictly positive"),
    Case(
        "max_new_tokens 0",
        "/generate",
        gen(max_new_tokens=0),
        422,
        "json",
        V + "`max_new_tokens` must be strictly positive",
    ),
    Case(
        "five stop sequences",
        "/generate",
        gen(stop=["a", "b", "c", "d", "e"]),
        422,
        "json",
        V + "`stop` supports up to 4 stop sequences. Given: 5",
    ),
    Case(
        "top_n_tokens 6",
        "/generate",
        gen(top_n_tokens=6),
        422,
        "json",
        V + "`top_n_tokens` must be >= 0 and <= 5. Given: 6",
    ),
    Case(
        "truncate 0",
        "/generate",
        gen(truncate=0),
        422,
        "json",
        V + "`truncate` must be strictly positive and less than 256. Given: 0",
    ),
    Case(
        "truncate too big",
        "/generate",
        gen(truncate=1000),
        422,
        "json",
        V + "`truncate` must be strictly positive and less than 256. Given: 1000",
    ),
    Case(
        "best_of 3",
        "/generate",
        gen(best_of=3, do_sample=True),
        422,
        "json",
        V + "`best_of` must be > 0 and <= 2. Given: 3",
    ),
    Case(
        "best_of greedy",
        "/generate",
        gen(best_of=2),
        422,
        "json",
        V + "you must use sampling when `best_of` is > 1",
    ),
    Case(
        "best_of with seed",
        "/generate",
        gen(best_of=2, do_sample=True, seed=1),
        422,
        "json",
        V + "`seed` must not be set when `best_of` > 1",
    ),
    Case(
        "too many input tokens",
        "/generate",
        {"inputs": " ".join(["hello"] * 300)},
        422,
        "json",
        V + "`inputs` must have less than 256 tokens. Given: 300",
    ),
    Case(
        "too many total tokens",
        "/generate",
        gen(max_new_tokens=511),
        422,
        "json",
        V
        + "`inputs` tokens + `max_new_tokens` must be <= 512. "
        + "Given: 2 `inputs` tokens and 511 `max_new_tokens`",
    ),
    Case(
        "grammar",
        "/generate",
        gen(grammar={"type": "json", "value": 5}),
        422,
        "json",
        V + "grammar is not supported",
    ),
    Case(
        "decoder_input_details in a stream",
        "/generate_stream",
        gen(decoder_input_details=True),
        200,
        "sse",
        V + "`decoder_input_details` == true is not supported when streaming tokens",
    ),
    Case(
        "best_of in a stream",
        "/",
        {**gen(best_of=2, do_sample=True), "stream": True},
        200,
        "sse",
        V + "`best_of` != 1 is not supported when streaming tokens",
    ),
    Case(
        "validation error in a stream",
        "/generate_stream",
        gen(top_k=0),
        200,
        "sse",
        V + "`top_k` must be strictly positive",
    ),
    Case("unknown route", "/nope", gen(), 404, "empty"),
    Case("wrong method", "/generate", None, 405, "empty", method="GET"),
    Case(
        "huge body",
        "/generate",
        {"inputs": "x" * 2_100_000},
        413,
        "plain",
        "Failed to buffer the request body",
    ),
    Case(
        "wrong content type",
        "/generate",
        b"<inputs/>",
        415,
        "plain",
        "Expected request with `Content-Type: application/json`",
        headers={"content-type": "application/xml"},
    ),
    Case(
        "no bearer token",
        "/generate",
        gen(),
        401,
        "unauthorized",
        "Missing or invalid bearer token",
        headers={"authorization": ""},
    ),
    Case(
        "wrong bearer token",
        "/v1/completions",
        {"prompt": "x"},
        401,
        "unauthorized",
        "Missing or invalid bearer token",
        headers={"authorization": "Bearer nope"},
    ),
    Case(
        "info without a token",
        "/info",
        None,
        401,
        "unauthorized",
        "Missing or invalid bearer token",
        method="GET",
        headers={"authorization": ""},
    ),
    Case(
        "basic instead of bearer",
        "/tokenize",
        {"inputs": "x"},
        401,
        "unauthorized",
        "Missing or invalid bearer token",
        headers={"authorization": f"Basic {API_KEY}"},
    ),
    Case("tokenize without inputs", "/tokenize", {}, 422, "plain", "Failed to deserialize"),
    Case(
        "chat without messages",
        "/v1/chat/completions",
        {"messages": []},
        422,
        "plain",
        "Failed to deserialize",
    ),
    Case(
        "chat logit_bias map",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 2}},
        422,
        "plain",
        "Failed to deserialize",
    ),
    Case(
        "chat negative temperature",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        422,
        "json",
        V + "`temperature` must be strictly positive",
    ),
    Case(
        "chat stream validation error",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "top_p": 2.0, "stream": True},
        200,
        "sse_openai",
        V + "`top_p` must be > 0.0 and < 1.0",
    ),
    *(
        Case(
            f"completion suffix{' streamed' if stream else ''}",
            "/v1/completions",
            {"prompt": "x", "suffix": "y", "stream": stream},
            422,
            "json",
            "Suffix is not supported and can be achieved by preprocessing the prompt.",
            error_type="suffix not supported",
        )
        for stream in (False, True)
    ),
    Case(
        "completion too many prompts",
        "/v1/completions",
        {"prompt": ["a"] * 5, "stream": True},
        422,
        "json",
        "Number of prompts exceeds the maximum allowed batch size of 4",
        error_type="batch size exceeded",
    ),
    Case(
        "completion empty prompt list",
        "/v1/completions",
        {"prompt": []},
        422,
        "plain",
        "Failed to deserialize the JSON body into the target type: prompt: Empty array detected.",
    ),
    *(
        Case(f"{name} 1e-300 (0 in float32)", "/generate", gen(**{name: 1e-300}), 422, "json", V + message)
        for name, message in [
            ("temperature", "`temperature` must be strictly positive"),
            ("repetition_penalty", "`repetition_penalty` must be strictly positive"),
            ("top_p", "`top_p` must be > 0.0 and < 1.0"),
            ("typical_p", "`typical_p` must be > 0.0 and < 1.0"),
        ]
    ),
    Case(
        "top_p rounds to 1 in float32",
        "/generate",
        gen(top_p=1 - 1e-12),
        422,
        "json",
        V + "`top_p` must be > 0.0 and < 1.0",
    ),
    Case(
        "temperature beyond float32",
        "/generate",
        gen(temperature=1e39),
        422,
        "json",
        V + "`temperature` must be a finite float32 (at most 3.4028235e38). Given: 1e+39",
    ),
    Case(
        "chat temperature 1e-300",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-300},
        422,
        "json",
        V + "`temperature` must be strictly positive",
    ),
    Case(
        "completion repetition_penalty 1e-300",
        "/v1/completions",
        {"prompt": "x", "repetition_penalty": 1e-300},
        422,
        "json",
        V + "`repetition_penalty` must be strictly positive",
    ),
    Case(
        "1e999 (infinity)",
        "/generate",
        b'{"inputs":"x","parameters":{"temperature":1e999}}',
        400,
        "plain",
        BAD_JSON + "number out of range",
    ),
    Case(
        "chat -1e999",
        "/v1/chat/completions",
        b'{"messages":[{"role":"user","content":"hi"}],"top_p":-1e999}',
        400,
        "plain",
        BAD_JSON + "number out of range",
    ),
    Case(
        "Infinity literal",
        "/generate",
        b'{"inputs":"x","parameters":{"top_p":Infinity}}',
        400,
        "plain",
        BAD_JSON,
    ),
    Case("lone surrogate", "/generate", b'{"inputs":"a\\ud800b"}', 400, "plain", BAD_JSON + "lone surrogate"),
    Case(
        "lone surrogate in a chat",
        "/v1/chat/completions",
        b'{"messages":[{"role":"user","content":"\\udc00"}]}',
        400,
        "plain",
        BAD_JSON + "lone surrogate",
    ),
    *(
        Case(f"200k deep on {path}", path, DEEP, 400, "plain", BAD_JSON + "recursion limit exceeded")
        for path in JSON_ROUTES
    ),
]


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_request(tiny_server: Server, case: Case) -> None:
    headers = {k.lower(): v for k, v in {**tiny_server.headers, **case.headers}.items()}
    headers = {k: v for k, v in headers.items() if v}
    with tiny_server.client() as client:
        client.headers.clear()
        if isinstance(case.body, bytes):
            response = client.request(case.method, case.path, content=case.body, headers=headers)
        elif case.body is None:
            response = client.request(case.method, case.path, headers=headers)
        else:
            response = client.request(case.method, case.path, json=case.body, headers=headers)
    assert response.status_code == case.status, response.text
    if case.kind in ("json", "unauthorized"):
        assert response.headers["content-type"].startswith("application/json")
        error_type = case.error_type if case.kind == "json" else "unauthorized"
        assert response.json() == {"error": case.message, "error_type": error_type}
        if case.kind == "unauthorized":
            assert response.headers["www-authenticate"] == "Bearer"
    elif case.kind == "plain":
        assert response.headers["content-type"].startswith("text/plain")
        assert response.text.startswith(case.message), response.text
    elif case.kind == "empty":
        assert response.content == b""
    else:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        if case.kind == "sse":
            assert [json.loads(e) for e in events] == [{"error": case.message, "error_type": "validation"}]
        else:
            assert json.loads(events[0]) == {"error": {"message": case.message, "http_status_code": 422}}
            assert events[1:] == ["[DONE]"]


def test_server_still_serves_after_bad_input(tiny_server: Server) -> None:
    with tiny_server.client() as client:
        for case in CASES[:5]:
            client.post(case.path, content=case.body if isinstance(case.body, bytes) else b"{}")
        assert client.get("/health").status_code == 200
        response = client.post("/generate", json=gen(max_new_tokens=3))
        assert response.status_code == 200
        assert isinstance(response.json()["generated_text"], str)


@pytest.mark.parametrize(
    "parameters",
    [
        {"do_sample": True, "temperature": 1e-40},
        {"do_sample": True, "repetition_penalty": 1e-40},
        {"repetition_penalty": 3e38},
        {"do_sample": True, "top_p": 0.01, "top_n_tokens": 3},
    ],
    ids=["subnormal temperature", "subnormal penalty", "huge penalty", "top tokens a warper removed"],
)
def test_extreme_valid_parameters_are_served(tiny_server: Server, parameters: dict[str, Any]) -> None:
    """Valid in float32, and once NaN or infinite logprobs (500): now finite numbers."""
    body = {"inputs": "Hello there", "parameters": {**parameters, "max_new_tokens": 3, "details": True}}
    with tiny_server.client() as client:
        response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    tokens = response.json()["details"]["tokens"]
    assert len(tokens) == 3
    assert all(isinstance(t["logprob"], float) for t in tokens)
