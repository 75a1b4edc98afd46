"""TGI's sampling rules on the TGI routes, OpenAI's on the OpenAI routes, and text that ends in a real U+FFFD
(tiny model behind real HTTP; SmolLM2's real tokenizer)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import decoders
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_devstack.models import tokenizer_dir
from llm_serving.detokenize import MAX_HELD, IncrementalDetokenizer
from llm_serving.engine.request import FinishReason
from llm_serving.sampling.params import StoppingParams
from llm_serving.sampling.stopping import check_stop
from tests.serving.conftest import Server

PROMPT = "Once upon a time,"
REPLACEMENT = 24211  # SmolLM2's token for the bytes EF BF BD: a real U+FFFD
SPLIT_CHAR = (23274, 115)  # "日" (E6 97 A5) as two tokens: E6 97, then A5


def generate(server: Server, **parameters: Any) -> dict[str, Any]:
    body = {"inputs": PROMPT, "parameters": {"details": True, **parameters}}
    with server.client() as client:
        response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def token_ids(body: dict[str, Any]) -> list[int]:
    return [t["id"] for t in body["details"]["tokens"]]


def prompt_ids(server: Server) -> list[int]:
    with server.client() as client:
        return [t["id"] for t in client.post("/tokenize", json={"inputs": PROMPT}).json()]


Penalty = Callable[[list[int], list[int]], torch.Tensor]


def greedy_loop(model: Any, prompt: list[int], n: int, penalty: Penalty) -> list[int]:
    """Greedy decoding by hand, subtracting `penalty(prompt, output)` from every step's logits."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
            out.append(int((logits - penalty(prompt, out)).argmax()))
    return out


def counts(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=vocab).float()


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]


def test_temperature_one_alone_is_greedy_on_tgi_routes(tiny_server: Server) -> None:
    greedy = generate(tiny_server, max_new_tokens=12)
    neutral = generate(tiny_server, max_new_tokens=12, temperature=1.0)
    assert token_ids(neutral) == token_ids(greedy)
    assert neutral["details"]["seed"] is None
    sampled = generate(tiny_server, max_new_tokens=12, temperature=1.0, do_sample=True, seed=3)
    assert sampled["details"]["seed"] == 3
    assert token_ids(sampled) != token_ids(greedy)


def test_temperature_one_samples_on_openai_routes(tiny_server: Server) -> None:
    texts = set()
    with tiny_server.client() as client:
        for seed in (1, 2):
            body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": seed}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            texts.add(response.json()["choices"][0]["text"])
    assert len(texts) == 2


def test_frequency_penalty_on_tgi_routes_is_tgis(tiny_server: Server, tiny_model: Any) -> None:
    """TGI: `penalty * count / len(prompt + output)`, the prompt counted."""
    prompt, vocab = prompt_ids(tiny_server), tiny_model.config.vocab_size

    def tgi(p: list[int], out: list[int]) -> torch.Tensor:
        return counts(p + out, vocab) / len(p + out) * 2.0

    served = token_ids(generate(tiny_server, max_new_tokens=10, frequency_penalty=2.0))
    assert served == greedy_loop(tiny_model, prompt, 10, tgi)
    first = generate(tiny_server, max_new_tokens=1, frequency_penalty=2.0)["details"]["tokens"][0]
    plain = generate(tiny_server, max_new_tokens=1)["details"]["tokens"][0]
    assert first["logprob"] != plain["logprob"], "the prompt's tokens are penalized before any output"


def test_frequency_penalty_on_openai_routes_is_openais(tiny_server: Server, tiny_model: Any) -> None:
    """OpenAI: `penalty * count` over the output only; at 2.0 the greedy output never repeats a token."""
    prompt, vocab = prompt_ids(tiny_server), tiny_model.config.vocab_size

    def openai(_: list[int], out: list[int]) -> torch.Tensor:
        return counts(out, vocab) * 2.0

    expected = greedy_loop(tiny_model, prompt, 10, openai)
    assert len(set(expected)) == len(expected)
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "frequency_penalty": 2.0}
    with tiny_server.client() as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == AutoTokenizer.from_pretrained(tokenizer_dir()).decode(
        expected, skip_special_tokens=True
    )


def test_top_tokens_come_from_the_processed_distribution(tiny_server: Server) -> None:
    """Only tokens the warpers kept are listed, with their logprob there: under a tiny nucleus, the one."""
    body = generate(tiny_server, max_new_tokens=6, do_sample=True, top_p=0.01, top_n_tokens=3, seed=1)
    for chosen, tops in zip(body["details"]["tokens"], body["details"]["top_tokens"], strict=True):
        assert [(t["id"], t["logprob"]) for t in tops] == [(chosen["id"], 0.0)]
    hot = generate(tiny_server, max_new_tokens=6, temperature=3.0, typical_p=0.3, top_n_tokens=5, seed=2)
    for tops in hot["details"]["top_tokens"]:
        assert all(-1e4 < t["logprob"] <= 0.0 for t in tops)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(tokenizer_dir())


def pieces(tokenizer: Any, tokens: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hi"))
    return [detok.push(t) for t in tokens]


def test_the_tokens_decode_as_the_tests_assume(tokenizer: Any) -> None:
    assert tokenizer.decode([REPLACEMENT]) == "\ufffd"
    assert tokenizer.decode([SPLIT_CHAR[0]]) == "\ufffd"
    assert tokenizer.decode(list(SPLIT_CHAR)) == "日"


def test_a_real_replacement_character_is_emitted_at_once(tokenizer: Any) -> None:
    assert pieces(tokenizer, [REPLACEMENT]) == ["\ufffd"]
    assert pieces(tokenizer, [REPLACEMENT, REPLACEMENT, *SPLIT_CHAR]) == ["\ufffd", "\ufffd", "", "日"]


def test_a_split_character_is_held_until_complete(tokenizer: Any) -> None:
    assert pieces(tokenizer, [*SPLIT_CHAR, REPLACEMENT]) == ["", "日", "\ufffd"]
    comma = tokenizer.encode(",")[0]
    assert pieces(tokenizer, [SPLIT_CHAR[0], comma]) == ["", "\ufffd,"], "a character never completed"


def test_stop_sequence_on_a_real_replacement_character(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hi"))
    stopping = StoppingParams(max_new_tokens=10, stop=("\ufffd",))
    reasons = []
    for n, token in enumerate([SPLIT_CHAR[0], SPLIT_CHAR[1], REPLACEMENT], start=1):
        piece = detok.push(token)
        reasons.append(check_stop(token, n, detok.text, piece, stopping, set()))
    assert reasons == [None, None, FinishReason.STOP_SEQUENCE]
    assert detok.text == "日\ufffd"


def test_without_known_token_bytes_a_replacement_character_is_held_boundedly() -> None:
    """A decoder whose bytes the detokenizer cannot see: held while it ends in U+FFFD, at most `MAX_HELD`."""
    other = AutoTokenizer.from_pretrained(tokenizer_dir())
    other.backend_tokenizer.decoder = decoders.Sequence([decoders.ByteLevel()])
    assert other.decode([REPLACEMENT]) == "\ufffd"
    assert pieces(other, [*SPLIT_CHAR]) == ["", "日"]
    assert pieces(other, [REPLACEMENT] * MAX_HELD) == [""] * (MAX_HELD - 1) + ["\ufffd" * MAX_HELD]
