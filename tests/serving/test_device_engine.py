"""The engine with the device sampler wired in (on CPU tensors here; on CUDA it is the default): greedy rows
with penalties give the CPU sampler's tokens through queueing and preemption (each request's slot counts
rebuilt when it runs again), a seeded sampled row gives the same tokens preempted or alone, and every slot
is returned once the requests are done."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llm_serving.engine.blocks import BlockPool
from llm_serving.engine.engine import Engine
from llm_serving.engine.factory import vocab_size
from llm_serving.engine.kv_cache import PagedKVCache
from llm_serving.engine.runner import ModelRunner
from llm_serving.engine.scheduler import Scheduler, SchedulerConfig
from llm_serving.loading import load, resolve
from llm_serving.sampling.device import DeviceSampler
from llm_serving.sampling.params import SamplingParams
from tests.serving import models
from tests.serving.test_paged_engine import TEXTS, drive, request, requests_of

BATCH = 3
PENALISED = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5)
SEEDED = SamplingParams(do_sample=True, seed=7, temperature=0.8, top_k=40, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, Any]:
    return load(resolve(str(models.tiny_model_dir())), "float32")


def engine(loaded: tuple[Any, Any], device_sampler: bool, blocks: int) -> Engine:
    model, tokenizer = loaded
    cache = PagedKVCache(model, blocks, 4)
    scheduler = Scheduler(
        SchedulerConfig(max_batch_prefill_tokens=64, max_batch_size=BATCH), BlockPool(blocks, 4)
    )
    sampler = DeviceSampler(BATCH, vocab_size(model), torch.device("cpu")) if device_sampler else None
    runner = ModelRunner(model, cache, device_logits=device_sampler)
    return Engine(runner, tokenizer, scheduler, set(), sampler=sampler)


def test_device_sampler_engine_gives_the_cpu_samplers_tokens_through_preemption(
    loaded: tuple[Any, Any],
) -> None:
    _, tokenizer = loaded
    prompts = [tuple(tokenizer(t)["input_ids"]) for t in TEXTS[:5]]

    def arrivals() -> dict[int, list[Any]]:
        return {
            0: [request(1, prompts[0], 20, PENALISED), request(2, prompts[1], 20, PENALISED)],
            1: [request(3, prompts[2], 20, PENALISED), request(4, prompts[3], 20, PENALISED)],
            2: [request(5, prompts[4], 20, SEEDED)],
        }

    on_cpu = drive(engine(loaded, device_sampler=False, blocks=64), arrivals())
    small = engine(loaded, device_sampler=True, blocks=14)  # 56 tokens: three requests cannot all finish
    tight = arrivals()
    run = drive(small, tight)
    assert sum(r.preemptions for r in requests_of(tight)) > 0, "nothing was preempted"
    for i in (1, 2, 3, 4):
        assert run.tokens[i] == on_cpu.tokens[i], f"request {i}"
    alone = drive(engine(loaded, device_sampler=True, blocks=64), {0: [request(5, prompts[4], 20, SEEDED)]})
    assert run.tokens[5] == alone.tokens[5]
    assert len(run.tokens[5]) == 20
    assert sorted(small._free_slots) == list(range(BATCH))
    assert not small._slots
