"""The walkthrough, unmodified in spirit, against SmolLM2: curl, InferenceClient, the OpenAI SDK."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, UnknownError
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.serving.conftest import Server

STOP = ["\nUser:", "<|endoftext|>", "</s>"]
PROMPT = "What can you do in Nuremberg, Germany? Give me 3 Tips"


def test_curl_post_root_with_bearer_token(tiny_server: Server) -> None:
    """`curl $URL -X POST -d '{"inputs":"Once upon a time,"}' -H "Authorization: Bearer …"`.

    With no `parameters` TGI samples up to `max_total_tokens`, so this runs on the tiny model.
    """
    assert shutil.which("curl"), "curl is missing (apt-get install curl)"
    base = ["curl", "-sS", tiny_server.url, "-X", "POST", "-d", '{"inputs":"Once upon a time,"}']
    out = subprocess.run(
        [*base, "-H", f"Authorization: Bearer {tiny_server.api_key}"],
        capture_output=True,
        check=True,
        timeout=600,
    )
    body = json.loads(out.stdout)
    assert isinstance(body, list)
    assert len(body) == 1
    text = body[0]["generated_text"]
    assert text.startswith("Once upon a time,")  # `/` returns the full text by default
    assert len(text) > len("Once upon a time,")
    unauthorized = subprocess.run(
        [*base, "-o", "/dev/null", "-w", "%{http_code}"], capture_output=True, check=True, timeout=60
    )
    assert unauthorized.stdout == b"401"


def test_inference_client_stream_details(smollm2_server: Server) -> None:
    """The walkthrough loop: skip special tokens, stop at a stop sequence, print the rest."""
    client = InferenceClient(smollm2_server.url, token=smollm2_server.api_key)
    pieces: list[str] = []
    last = None
    stream = client.text_generation(
        PROMPT,
        stream=True,
        details=True,
        max_new_tokens=512,
        top_k=30,
        top_p=0.9,
        temperature=0.2,
        repetition_penalty=1.02,
        stop=STOP,
    )
    for r in stream:
        last = r
        if r.token.special:
            continue
        if r.token.text in STOP:
            break
        pieces.append(r.token.text)
    assert last is not None
    assert last.details is not None
    assert last.details.finish_reason in ("length", "eos_token", "stop_sequence")
    assert 0 < last.details.generated_tokens <= 512
    assert last.generated_text is not None
    text = "".join(pieces)
    assert "Nuremberg" in text or len(text.split()) > 5
    assert last.generated_text.startswith(PROMPT)  # `/` defaults to return_full_text
    assert text.strip() in last.generated_text


def test_inference_client_without_token_is_refused(smollm2_server: Server) -> None:
    with pytest.raises(UnknownError, match="Missing or invalid bearer token") as info:
        InferenceClient(smollm2_server.url).text_generation(PROMPT, max_new_tokens=2)
    cause = info.value.__cause__  # the client reads the TGI error body; its HTTP error is the cause
    assert isinstance(cause, HfHubHTTPError)
    assert cause.response is not None
    assert cause.response.status_code == 401


def test_inference_client_plain_and_greedy_is_deterministic(smollm2_server: Server) -> None:
    client = InferenceClient(smollm2_server.url, token=smollm2_server.api_key)
    first = client.text_generation("The capital of France is", max_new_tokens=8, do_sample=False)
    second = client.text_generation("The capital of France is", max_new_tokens=8, do_sample=False)
    assert first == second
    assert "Paris" in first


def test_openai_sdk_chat(smollm2_server: Server) -> None:
    client = OpenAI(base_url=f"{smollm2_server.url}/v1", api_key=smollm2_server.api_key)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the capital of France? Answer in one word."}
    ]
    done = client.chat.completions.create(model="tgi", messages=messages, max_tokens=16, temperature=0)
    assert done.object == "chat.completion"
    content = done.choices[0].message.content
    assert content is not None
    assert "Paris" in content
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None
    assert done.usage.completion_tokens > 0

    chat_stream = client.chat.completions.create(
        model="tgi",
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(chat_stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [done.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_openai_sdk_without_key_is_refused(smollm2_server: Server) -> None:
    response = httpx.post(
        f"{smollm2_server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 401
