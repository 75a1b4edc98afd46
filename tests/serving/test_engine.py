"""The engine in-process (no HTTP): EOS handling, cancellation, failed steps, preemption and chunked prompts
seen as events, incremental detokenization."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from llm_serving.detokenize import IncrementalDetokenizer
from llm_serving.engine.engine import Engine
from llm_serving.engine.factory import EngineConfig, build_engine
from llm_serving.engine.request import FinishReason, Request
from llm_serving.loading import load, resolve
from llm_serving.outputs import FailureEvent, StepStats, TokenEvent
from llm_serving.sampling.params import SamplingParams, StoppingParams


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[Any, Any]:
    return load(resolve(str(tiny_dir)), "float32")


CONFIG = EngineConfig(max_batch_total_tokens=4096, max_batch_prefill_tokens=4096, max_batch_size=8)
PROMPT = "Once upon a time,"


def engine(tiny: tuple[Any, Any], eos: set[int], config: EngineConfig = CONFIG) -> Engine:
    model, tokenizer = tiny
    return build_engine(model, tokenizer, eos, config)


def request(
    tokenizer: Any, i: int, max_new: int = 8, prompt: str = PROMPT, prompt_logprobs: bool = False
) -> Request:
    ids = tuple(tokenizer(prompt)["input_ids"])
    stopping = StoppingParams(max_new_tokens=max_new)
    return Request(i, ids, SamplingParams(), stopping, arrival=0.0, prompt_logprobs=prompt_logprobs)


def run(e: Engine, stats: list[StepStats] | None = None) -> dict[int, list[TokenEvent]]:
    events: dict[int, list[TokenEvent]] = {}
    while e.has_work:
        step_events, step_stats = e.step()
        for event in step_events:
            assert isinstance(event, TokenEvent)
            events.setdefault(event.request_id, []).append(event)
        if stats is not None and step_stats is not None:
            stats.append(step_stats)
    return events


@contextmanager
def forward_calls(model: Any, fail_at: int | None = None) -> Iterator[list[int]]:
    """Count the model's forward calls; the `fail_at`-th one raises a real RuntimeError."""
    calls: list[int] = []

    def hook(*_: Any) -> None:
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError(f"injected fault at forward call {len(calls)}")

    handle = model.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_eos_token_ends_generation_and_counts(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    free = engine(tiny, set())
    free.add(request(tokenizer, 1))
    tokens = [ev.token.id for ev in run(free)[1]]
    stopping = engine(tiny, {tokens[2]})
    stopping.add(request(tokenizer, 1))
    events = run(stopping)[1]
    assert [ev.token.id for ev in events] == tokens[:3]
    assert events[-1].finish_reason is FinishReason.EOS_TOKEN
    assert all(ev.finish_reason is None for ev in events[:-1])


def test_cancel_running_request_frees_its_row(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    e = engine(tiny, set())
    e.add(request(tokenizer, 1, max_new=50))
    e.add(request(tokenizer, 2, max_new=5))
    e.step()
    e.cancel(1)
    events = run(e)
    assert 1 not in events
    assert len(events[2]) == 4
    assert e.cache_stats().used == 0  # every block released


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    expected = [ev.token.id for ev in run_one(tiny, request(tokenizer, 1))]
    e = engine(tiny, set())
    with forward_calls(model, fail_at=2):
        e.add(request(tokenizer, 1))
        first, _ = e.step()
        failed, stats = e.step()
        assert [type(ev) for ev in first] == [TokenEvent]
        assert failed == [FailureEvent(1, "RuntimeError: injected fault at forward call 2")]
        assert stats is not None
        assert stats.failed
        assert e.cache_stats().used == 0
        e.add(request(tokenizer, 2))
        assert [ev.token.id for ev in run(e)[2]] == expected


def test_a_step_that_only_releases_blocks_runs_no_forward(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    e = engine(tiny, set())
    e.add(request(tokenizer, 1, max_new=2))
    with forward_calls(model) as calls:
        assert run(e)[1][-1].finish_reason is FinishReason.LENGTH
    assert len(calls) == 2  # the prefill and one decode; the step that released the blocks ran nothing
    assert e.cache_stats().used == 0


def run_one(tiny: tuple[Any, Any], r: Request, config: EngineConfig = CONFIG) -> list[TokenEvent]:
    e = engine(tiny, set(), config)
    e.add(r)
    return run(e)[r.id]


def test_preempted_requests_emit_each_token_once(tiny: tuple[Any, Any]) -> None:
    """Four requests of 7 + 24 tokens in a 64-token cache: the newest are preempted and recomputed; every
    request still streams exactly its tokens, in order, each once, and only its first token is `first`."""
    _, tokenizer = tiny
    alone = [ev.token.id for ev in run_one(tiny, request(tokenizer, 1, max_new=24))]
    tight = replace(CONFIG, max_batch_total_tokens=64, block_size=4)
    e = engine(tiny, set(), tight)
    for i in range(1, 5):
        e.add(request(tokenizer, i, max_new=24))
    stats: list[StepStats] = []
    events = run(e, stats)
    assert sum(s.preemptions for s in stats) > 0
    for i in range(1, 5):
        assert [ev.token.id for ev in events[i]] == alone
        assert [ev.queued is not None for ev in events[i]] == [True] + [False] * 23
    assert e.cache_stats().used == 0


def test_prompt_logprobs_gather_across_prefill_chunks(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    prompt = "Once upon a time, in a land far away, there lived a very small dragon."
    whole = run_one(tiny, request(tokenizer, 1, prompt=prompt, prompt_logprobs=True))
    chunked = run_one(
        tiny,
        request(tokenizer, 1, prompt=prompt, prompt_logprobs=True),
        replace(CONFIG, max_batch_prefill_tokens=5),
    )
    expected = whole[0].prompt_logprobs
    assert expected is not None
    assert len(expected) == len(tokenizer(prompt)["input_ids"]) - 1
    assert chunked[0].prompt_logprobs == pytest.approx(expected, abs=1e-4)
    assert [ev.token.id for ev in chunked] == [ev.token.id for ev in whole]
    assert all(ev.prompt_logprobs is None for ev in chunked[1:])


def test_incremental_detokenizer_never_splits_characters(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    text = "naïve café — 東京 😀 wörld"
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
