"""OpenAI routes through the OpenAI SDK and raw HTTP (tiny model)."""

from __future__ import annotations

import json

from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.serving.conftest import Server


def sdk(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)


def test_models_lists_the_served_model(tiny_server: Server) -> None:
    models = sdk(tiny_server).models.list()
    assert [m.id for m in models.data] == ["tiny-llama-0.1.2-v1"]


def test_completions_plain_and_streamed_agree(tiny_server: Server) -> None:
    client = sdk(tiny_server)
    done = client.completions.create(model="tgi", prompt="Once upon a time,", max_tokens=6, temperature=0)
    assert done.object == "text_completion"
    assert done.model == "tiny-llama-0.1.2-v1"
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert done.usage.completion_tokens == 6
    chunks = list(
        client.completions.create(
            model="x", prompt="Once upon a time,", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks] == [""] * 5 + ["length"]
    assert chunks[-1].usage is not None
    assert chunks[-1].model == "x"


def test_completions_with_several_prompts(tiny_server: Server) -> None:
    done = sdk(tiny_server).completions.create(model="tgi", prompt=["a", "b"], max_tokens=2, temperature=0)
    assert [c.index for c in done.choices] == [0, 1]


def test_chat_logprobs_seed_and_stop(tiny_server: Server) -> None:
    client = sdk(tiny_server)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story"}]
    a = client.chat.completions.create(
        model="tgi",
        messages=messages,
        max_tokens=8,
        seed=3,
        logprobs=True,
        top_logprobs=2,
    )
    b = client.chat.completions.create(model="tgi", messages=messages, max_tokens=8, seed=3)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].logprobs is not None
    assert a.choices[0].logprobs.content is not None
    assert len(a.choices[0].logprobs.content) == 8
    assert all(len(t.top_logprobs) == 2 for t in a.choices[0].logprobs.content)
    content = a.choices[0].message.content or ""
    word = content.split()[1] if len(content.split()) > 1 else content[:3]
    stopped = client.chat.completions.create(
        model="tgi",
        messages=messages,
        max_tokens=8,
        seed=3,
        stop=[word],
    )
    assert str(stopped.choices[0].finish_reason) == "stop_sequence"  # TGI passes it through
    assert (stopped.choices[0].message.content or "").endswith(word) or word in (
        stopped.choices[0].message.content or ""
    )


def test_chat_stream_wire_format(tiny_server: Server) -> None:
    body = {"model": "tgi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with tiny_server.client() as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 3
    assert all(
        c["object"] == "chat.completion.chunk" and c["choices"][0]["delta"]["role"] == "assistant"
        for c in chunks
    )
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
