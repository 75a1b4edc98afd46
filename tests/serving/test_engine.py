"""The engine in-process (no HTTP): EOS handling, cancellation, incremental detokenization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llm_serving.detokenize import IncrementalDetokenizer
from llm_serving.engine.engine import Engine, TokenEvent
from llm_serving.engine.request import FinishReason, Request
from llm_serving.engine.runner import ModelRunner
from llm_serving.engine.scheduler import Scheduler, SchedulerConfig
from llm_serving.loading import load, resolve
from llm_serving.sampling.params import SamplingParams, StoppingParams


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[Any, Any]:
    return load(resolve(str(tiny_dir)), "float32")


def engine(tiny: tuple[Any, Any], eos: set[int]) -> Engine:
    model, tokenizer = tiny
    return Engine(ModelRunner(model), tokenizer, Scheduler(SchedulerConfig(4096, 4096, 8)), eos)


def request(tokenizer: Any, i: int, max_new: int = 8) -> Request:
    ids = tuple(tokenizer("Once upon a time,")["input_ids"])
    return Request(i, ids, SamplingParams(), StoppingParams(max_new_tokens=max_new), arrival=0.0)


def run(e: Engine) -> dict[int, list[TokenEvent]]:
    events: dict[int, list[TokenEvent]] = {}
    while e.has_work:
        for event in e.step()[0]:
            assert isinstance(event, TokenEvent)
            events.setdefault(event.request_id, []).append(event)
    return events


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
    assert e.runner.batch is None


def test_incremental_detokenizer_never_splits_characters(tiny: tuple[Any, Any]) -> None:
    _, tokenizer = tiny
    text = "naïve café — 東京 😀 wörld"
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
