"""Each walkthrough parameter changes the output the way it should (tiny model, real HTTP)."""

from __future__ import annotations

from typing import Any

from huggingface_hub import InferenceClient

from tests.serving.conftest import Server

PROMPT = "Once upon a time,"


def generate(server: Server, inputs: str = PROMPT, **parameters: Any) -> dict[str, Any]:
    parameters.setdefault("details", True)
    with server.client() as client:
        response = client.post("/generate", json={"inputs": inputs, "parameters": parameters})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def token_ids(body: dict[str, Any]) -> list[int]:
    return [t["id"] for t in body["details"]["tokens"]]


def test_max_new_tokens_bounds_the_output(tiny_server: Server) -> None:
    for n in (1, 7):
        body = generate(tiny_server, max_new_tokens=n, do_sample=False)
        assert body["details"]["generated_tokens"] == n
        assert body["details"]["finish_reason"] == "length"


def test_seed_makes_sampling_reproducible(tiny_server: Server) -> None:
    a = generate(tiny_server, max_new_tokens=12, do_sample=True, seed=7)
    b = generate(tiny_server, max_new_tokens=12, do_sample=True, seed=7)
    c = generate(tiny_server, max_new_tokens=12, do_sample=True, seed=8)
    assert token_ids(a) == token_ids(b)
    assert a["details"]["seed"] == 7
    assert token_ids(a) != token_ids(c)


def test_greedy_reports_no_seed(tiny_server: Server) -> None:
    assert generate(tiny_server, max_new_tokens=2)["details"]["seed"] is None


def test_top_k_one_is_greedy(tiny_server: Server) -> None:
    greedy = token_ids(generate(tiny_server, max_new_tokens=12))
    for seed in (1, 2, 3):
        assert token_ids(generate(tiny_server, max_new_tokens=12, top_k=1, seed=seed)) == greedy


def test_top_k_limits_the_candidates(tiny_server: Server) -> None:
    """With top_k=3 every chosen token is among the 3 most likely (top_n_tokens shows them)."""
    body = generate(tiny_server, max_new_tokens=10, top_k=3, seed=5, top_n_tokens=3)
    for chosen, tops in zip(body["details"]["tokens"], body["details"]["top_tokens"], strict=True):
        assert chosen["id"] in {t["id"] for t in tops}
    wide = generate(tiny_server, max_new_tokens=10, temperature=5.0, seed=5, top_n_tokens=3)
    outside = [
        c
        for c, tops in zip(wide["details"]["tokens"], wide["details"]["top_tokens"], strict=True)
        if c["id"] not in {t["id"] for t in tops}
    ]
    assert outside, "without top_k a hot temperature picks tokens outside the top 3"


def test_tiny_top_p_is_greedy(tiny_server: Server) -> None:
    greedy = token_ids(generate(tiny_server, max_new_tokens=12))
    assert token_ids(generate(tiny_server, max_new_tokens=12, top_p=0.001, seed=3)) == greedy


def test_top_p_changes_sampling(tiny_server: Server) -> None:
    plain = generate(tiny_server, max_new_tokens=16, temperature=3.0, seed=11)
    nucleus = generate(tiny_server, max_new_tokens=16, temperature=3.0, top_p=0.5, seed=11)
    assert token_ids(plain) != token_ids(nucleus)

    # Under a nucleus the chosen tokens are more likely on average.
    def mean(b: dict[str, Any]) -> float:
        return sum(float(t["logprob"]) for t in b["details"]["tokens"]) / 16

    assert mean(nucleus) > mean(plain)


def test_low_temperature_is_greedy_and_high_temperature_is_not(tiny_server: Server) -> None:
    greedy = token_ids(generate(tiny_server, max_new_tokens=12))
    assert token_ids(generate(tiny_server, max_new_tokens=12, temperature=0.01, seed=4)) == greedy
    hot = [token_ids(generate(tiny_server, max_new_tokens=12, temperature=10.0, seed=s)) for s in (4, 5)]
    assert hot[0] != greedy
    assert hot[0] != hot[1]


def prompt_ids(server: Server, text: str) -> set[int]:
    with server.client() as client:
        return {t["id"] for t in client.post("/tokenize", json={"inputs": text}).json()}


def test_repetition_penalty_pushes_away_from_seen_tokens(tiny_server: Server) -> None:
    """Above 1 seen tokens (prompt and output) are avoided; below 1 they are preferred."""
    seen = prompt_ids(tiny_server, PROMPT)
    avoid = token_ids(generate(tiny_server, max_new_tokens=20, repetition_penalty=50.0))
    assert len(set(avoid)) == len(avoid)
    assert not set(avoid) & seen
    prefer = token_ids(generate(tiny_server, max_new_tokens=20, repetition_penalty=0.02))
    for i, token in enumerate(prefer):
        assert token in seen | set(prefer[:i]), "a reward for repeats only picks tokens already seen"


def test_typical_p_and_watermark_change_sampling(tiny_server: Server) -> None:
    base = token_ids(generate(tiny_server, max_new_tokens=16, temperature=3.0, seed=9))
    assert token_ids(generate(tiny_server, max_new_tokens=16, temperature=3.0, typical_p=0.2, seed=9)) != base
    assert (
        token_ids(generate(tiny_server, max_new_tokens=16, temperature=3.0, watermark=True, seed=9)) != base
    )


def test_stop_sequence_ends_generation_and_stays_in_text(tiny_server: Server) -> None:
    full = generate(tiny_server, max_new_tokens=20)
    pieces = [t["text"] for t in full["details"]["tokens"]]
    stop = pieces[5].strip() or pieces[5]
    stopped = generate(tiny_server, max_new_tokens=20, stop=[stop, "never-appears"])
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"].endswith(pieces[5]) or stop in stopped["generated_text"]
    assert stopped["details"]["generated_tokens"] <= 6


def test_return_full_text_and_root_default(tiny_server: Server) -> None:
    body = generate(tiny_server, max_new_tokens=3, return_full_text=True)
    assert body["generated_text"].startswith(PROMPT)
    assert not generate(tiny_server, max_new_tokens=3)["generated_text"].startswith(PROMPT)
    with tiny_server.client() as client:
        root = client.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}).json()
        assert root[0]["generated_text"].startswith(PROMPT)
        off = client.post(
            "/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "return_full_text": False}}
        )
        assert not off.json()[0]["generated_text"].startswith(PROMPT)


def test_truncate_keeps_the_last_tokens(tiny_server: Server) -> None:
    long_prompt = "one two three four five six seven eight nine ten " * 3
    body = generate(tiny_server, long_prompt, max_new_tokens=1, truncate=4, decoder_input_details=True)
    assert len(body["details"]["prefill"]) == 4
    tail = "".join(t["text"] for t in body["details"]["prefill"])
    assert long_prompt.rstrip().endswith(tail.strip())


def test_decoder_input_details_and_details_off(tiny_server: Server) -> None:
    body = generate(tiny_server, "Hello there, friend", max_new_tokens=2, decoder_input_details=True)
    prefill = body["details"]["prefill"]
    assert prefill[0]["logprob"] is None
    assert all(p["logprob"] <= 0 for p in prefill[1:])
    assert "".join(p["text"] for p in prefill) == "Hello there, friend"
    plain = generate(tiny_server, max_new_tokens=2, details=False)
    assert set(plain) == {"generated_text"}


def test_best_of_returns_the_most_likely_and_the_others(tiny_server: Server) -> None:
    body = generate(tiny_server, max_new_tokens=6, best_of=2, do_sample=True)
    others = body["details"]["best_of_sequences"]
    assert len(others) == 1
    best = sum(t["logprob"] for t in body["details"]["tokens"])
    assert best >= sum(t["logprob"] for t in others[0]["tokens"])


def test_top_n_tokens_in_stream(tiny_server: Server) -> None:
    client = InferenceClient(tiny_server.url, token=tiny_server.api_key)
    events = list(client.text_generation(PROMPT, max_new_tokens=3, top_n_tokens=2, stream=True, details=True))
    assert all(len(e.top_tokens or []) == 2 for e in events)


def test_stream_events_carry_index_token_and_final_text(tiny_server: Server) -> None:
    client = InferenceClient(tiny_server.url, token=tiny_server.api_key)
    stream = client.text_generation(
        PROMPT, max_new_tokens=4, stream=True, details=True, do_sample=False, return_full_text=False
    )
    events = list(stream)
    assert [e.index for e in events] == [1, 2, 3, 4]
    assert all(e.token.special is False for e in events)
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].details is not None
    assert events[-1].details.generated_tokens == 4
    assert events[-1].generated_text == "".join(e.token.text for e in events)
