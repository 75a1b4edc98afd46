"""The engine token for token against `model.generate` greedy per prompt (float32, CPU): staggered arrivals,
chunked prefill beside decoding rows, preemption, prefix-cache hits, prompt logprobs, seeded sampling beside
greedy rows; on a tiny Llama, a GQA Qwen3, a sliding-window Gemma3 and SmolLM2."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_serving.engine.engine import Engine
from llm_serving.engine.factory import EngineConfig, build_engine
from llm_serving.engine.request import Request
from llm_serving.loading import load, resolve
from llm_serving.outputs import TokenEvent
from llm_serving.sampling.params import SamplingParams, StoppingParams
from tests.serving import models

ARCHITECTURES: dict[str, Callable[[], Path]] = {
    "llama": models.tiny_model_dir,
    "qwen3-gqa": models.tiny_qwen3_dir,
    "gemma3-sliding": models.tiny_gemma3_dir,
}
CAPACITY = 4096
"""KV tokens of every engine here unless a test needs fewer (never sized from free memory in tests)."""

TEXTS = (
    "Once upon a time,",
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "In a quiet village by the sea there lived an old fisherman who",
    "Water boils at",
    "List three colours: red,",
)
SYSTEM = "You are a careful assistant. Answer briefly, in plain English, and never invent facts. Question:"
LONG = " ".join(TEXTS) + " Then the story went on for a while, and nobody knew how it would end."


@dataclass
class Loaded:
    """A model for the engines, an untouched twin for the references, and their tokenizer."""

    model: Any
    reference: Any
    tokenizer: Any
    _generated: dict[tuple[tuple[int, ...], int], list[int]] = field(default_factory=dict)

    def ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text)["input_ids"])

    def generate(self, prompt: Sequence[int], max_new: int) -> list[int]:
        """`model.generate` greedy, no EOS stop."""
        key = (tuple(prompt), max_new)
        if key not in self._generated:
            x = torch.tensor([prompt])
            out = self.reference.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=max_new,
                eos_token_id=None,
                pad_token_id=0,
            )
            self._generated[key] = out[0, len(prompt) :].tolist()
            assert len(self._generated[key]) == max_new
        return self._generated[key]

    def prompt_logprobs(self, prompt: Sequence[int]) -> list[float]:
        """One full forward: log p(prompt[j + 1] | prompt[: j + 1]) for every j."""
        with torch.inference_mode():
            logits = self.reference(torch.tensor([prompt])).logits[0, :-1].float()
        target = torch.tensor(prompt[1:]).unsqueeze(1)
        values: list[float] = logits.log_softmax(dim=-1).gather(1, target).squeeze(1).tolist()
        return values


def _load(model_dir: Path) -> Loaded:
    source = resolve(str(model_dir))
    model, tokenizer = load(source, "float32")
    reference, _ = load(source, "float32")
    return Loaded(model=model, reference=reference, tokenizer=tokenizer)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these small forwards gain little from a second one, and on cores shared with other
    test processes a thread waiting for a busy core slows every step many times over. References and engines
    run alike, so exactness does not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def tiny(request: pytest.FixtureRequest) -> Loaded:
    return _load(ARCHITECTURES[request.param]())


def engine(m: Loaded, **config: Any) -> Engine:
    """An engine with no EOS (every request runs to its max_new_tokens)."""
    return build_engine(
        m.model, m.tokenizer, set(), EngineConfig(**{"max_batch_total_tokens": CAPACITY, **config})
    )


def request(
    i: int,
    prompt: tuple[int, ...],
    max_new: int,
    sampling: SamplingParams | None = None,
    prompt_logprobs: bool = False,
) -> Request:
    return Request(
        i,
        prompt,
        sampling or SamplingParams(),
        StoppingParams(max_new_tokens=max_new),
        arrival=0.0,
        prompt_logprobs=prompt_logprobs,
    )


@dataclass
class Run:
    tokens: dict[int, list[int]]
    steps: dict[int, list[int]]
    """For each request, the step that produced each of its tokens."""
    first: dict[int, TokenEvent]
    preempted_before_first: set[int]
    """Requests preempted before their first token (in their prefill)."""


def drive(
    e: Engine,
    arrivals: Mapping[int, Sequence[Request]],
    cancels: Mapping[int, Sequence[int]] | None = None,
    max_steps: int = 2000,
) -> Run:
    """Add `arrivals[k]` (and cancel the ids `cancels[k]`) right before step k; step until no work is left and
    nothing more is to arrive."""
    run = Run(tokens={}, steps={}, first={}, preempted_before_first=set())
    by_id = {r.id: r for r in requests_of(arrivals)}
    last_arrival = max(arrivals, default=0)
    step = 0
    while e.has_work or step <= last_arrival:
        for r in arrivals.get(step, ()):
            e.add(r)
        for i in (cancels or {}).get(step, ()):
            e.cancel(i)
        events, _ = e.step()
        for event in events:
            assert isinstance(event, TokenEvent), event
            if event.request_id not in run.first and by_id[event.request_id].preemptions:
                run.preempted_before_first.add(event.request_id)
            run.first.setdefault(event.request_id, event)
            run.tokens.setdefault(event.request_id, []).append(event.token.id)
            run.steps.setdefault(event.request_id, []).append(step)
        step += 1
        assert step < max_steps, "the engine made no progress"
    return run


def requests_of(arrivals: Mapping[int, Sequence[Request]]) -> Iterator[Request]:
    for batch in arrivals.values():
        yield from batch


def assert_greedy_exact(m: Loaded, run: Run, requests: Iterator[Request]) -> None:
    for r in requests:
        want = m.generate(r.prompt_ids, r.stopping.max_new_tokens)
        assert run.tokens.get(r.id) == want, f"request {r.id} ({len(r.prompt_ids)} prompt tokens)"


def test_staggered_arrivals_match_generate(tiny: Loaded) -> None:
    prompts = [tiny.ids(t) for t in TEXTS]
    arrivals = {
        0: [request(1, prompts[0], 12)],
        1: [request(2, prompts[1], 20)],
        3: [request(3, prompts[2], 6), request(4, prompts[3], 16)],
        7: [request(5, prompts[4], 10)],
        40: [request(6, prompts[5], 8)],  # after every other request has finished
    }
    run = drive(engine(tiny, max_batch_size=3), arrivals)
    assert_greedy_exact(tiny, run, requests_of(arrivals))
    assert max(run.steps[i][-1] for i in range(1, 6)) < 40


def test_cancelled_request_releases_its_blocks_and_the_others_stay_exact(tiny: Loaded) -> None:
    prompts = [tiny.ids(t) for t in TEXTS[:3]]
    arrivals = {0: [request(1, prompts[0], 40), request(2, prompts[1], 12)], 2: [request(3, prompts[2], 16)]}
    e = engine(tiny, block_size=4)
    run = drive(e, arrivals, cancels={5: [1]})
    assert len(run.tokens[1]) < 40
    assert run.tokens[1] == tiny.generate(prompts[0], 40)[: len(run.tokens[1])]
    assert_greedy_exact(tiny, run, (r for r in requests_of(arrivals) if r.id != 1))
    assert e.cache_stats().used == 0


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(tiny: Loaded) -> None:
    chunk = 8
    long_prompt = tiny.ids(LONG)
    arrive = 3
    arrivals = {
        # (LONG begins with TEXTS[0]: not one of these, so no block of the long prompt is cached)
        0: [request(1, tiny.ids(TEXTS[1]), 30), request(2, tiny.ids(TEXTS[4]), 30)],
        arrive: [request(3, long_prompt, 8)],
    }
    run = drive(engine(tiny, max_batch_prefill_tokens=chunk, block_size=4), arrivals)
    assert_greedy_exact(tiny, run, requests_of(arrivals))
    first = run.steps[3][0]
    assert first >= arrive + math.ceil(len(long_prompt) / chunk) - 1, "the long prompt ran in one step"
    for decoding in (1, 2):
        assert set(range(arrive, first + 1)) <= set(run.steps[decoding]), "a decoding row stalled"


def test_without_chunked_prefill_a_long_prompt_runs_whole(tiny: Loaded) -> None:
    arrivals = {0: [request(1, tiny.ids(TEXTS[0]), 10)], 2: [request(2, tiny.ids(LONG), 6)]}
    run = drive(engine(tiny, max_batch_prefill_tokens=8, chunked_prefill=False, block_size=4), arrivals)
    assert_greedy_exact(tiny, run, requests_of(arrivals))
    assert run.steps[2][0] == 2


def test_prompt_logprobs_of_a_chunked_prompt_match_a_full_forward(tiny: Loaded) -> None:
    long_prompt = tiny.ids(LONG)
    arrivals = {
        0: [request(1, tiny.ids(TEXTS[1]), 12)],
        1: [request(2, long_prompt, 4, prompt_logprobs=True)],
    }
    run = drive(engine(tiny, max_batch_prefill_tokens=8, block_size=4), arrivals)
    assert_greedy_exact(tiny, run, requests_of(arrivals))
    got = run.first[2].prompt_logprobs
    assert got is not None
    assert got == pytest.approx(tiny.prompt_logprobs(long_prompt), abs=1e-4)


def test_preemption_keeps_outputs_exact(tiny: Loaded) -> None:
    # 12 blocks of 4 tokens: each request fits alone (<= 34 tokens), three together cannot finish.
    seeded = SamplingParams(do_sample=True, seed=7, temperature=0.8, top_k=40)
    prompts = [tiny.ids(t) for t in (TEXTS[0], TEXTS[1], TEXTS[4], TEXTS[5])]
    alone = drive(engine(tiny, block_size=4), {0: [request(4, prompts[3], 24, seeded)]}).tokens[4]
    arrivals = {
        0: [request(1, prompts[0], 24), request(2, prompts[1], 24)],
        1: [request(3, prompts[2], 24), request(4, prompts[3], 24, seeded)],
    }
    e = engine(tiny, max_batch_total_tokens=48, block_size=4)
    run = drive(e, arrivals)
    assert sum(r.preemptions for r in requests_of(arrivals)) > 0, "nothing was preempted"
    assert_greedy_exact(tiny, run, (r for r in requests_of(arrivals) if r.id != 4))
    assert run.tokens[4] == alone
    assert e.cache_stats().used == 0


def test_a_request_larger_than_the_cache_is_refused_and_the_engine_goes_on(tiny: Loaded) -> None:
    e = engine(tiny, max_batch_total_tokens=32, block_size=4)
    prompt = tiny.ids(TEXTS[3])
    with pytest.raises(ValueError, match="32"):  # the message names the capacity
        e.add(request(1, prompt, 33 - len(prompt)))
    arrivals = {0: [request(2, prompt, 32 - len(prompt))]}
    assert_greedy_exact(tiny, drive(e, arrivals), requests_of(arrivals))


def test_preempted_chunked_prefill_recomputes_exact_prompt_logprobs(tiny: Loaded) -> None:
    # 16 blocks of 4 tokens: the long prompt (50 tokens, 8 per step) cannot finish its prefill beside two
    # growing rows; being the newest it is preempted, then prefilled again from the start.
    long_prompt = tiny.ids(LONG)[:50]
    arrivals = {
        0: [request(1, tiny.ids(TEXTS[1]), 24), request(2, tiny.ids(TEXTS[4]), 24)],
        2: [request(3, long_prompt, 4, prompt_logprobs=True)],
    }
    run = drive(engine(tiny, max_batch_total_tokens=64, max_batch_prefill_tokens=8, block_size=4), arrivals)
    assert 3 in run.preempted_before_first, "the long prompt was not preempted in its prefill"
    assert_greedy_exact(tiny, run, requests_of(arrivals))
    got = run.first[3].prompt_logprobs
    assert got is not None
    assert got == pytest.approx(tiny.prompt_logprobs(long_prompt), abs=1e-4)


def test_prefix_cache_hits_match_generate(tiny: Loaded) -> None:
    block = 4
    system = tiny.ids(SYSTEM)
    shared = len(system) // block * block
    prompts = [tiny.ids(f"{SYSTEM} {t}") for t in TEXTS[:4]]
    assert all(p[:shared] == system[:shared] for p in prompts)
    arrivals = {
        0: [request(1, prompts[0], 12)],
        2: [request(2, prompts[1], 12)],  # while 1 runs: its blocks are shared
        3: [request(3, prompts[2], 8)],
        # after the others finished: cached, unreferenced blocks; 5 is made of cached full blocks only (its
        # last token must still be computed, for its logits)
        20: [request(4, prompts[3], 8), request(5, prompts[0][: len(prompts[0]) // block * block], 8)],
    }
    e = engine(tiny, block_size=block)
    run = drive(e, arrivals)
    assert_greedy_exact(tiny, run, requests_of(arrivals))
    stats = e.cache_stats()
    assert stats.prefix_hits >= 4 * shared
    assert stats.prefix_queries >= stats.prefix_hits
    assert stats.used == 0
    assert stats.cached > 0
    off = engine(tiny, block_size=block, prefix_caching=False)
    fresh = {
        k: [request(r.id, r.prompt_ids, r.stopping.max_new_tokens) for r in v] for k, v in arrivals.items()
    }
    assert drive(off, fresh).tokens == run.tokens
    assert off.cache_stats().prefix_hits == 0


def test_evicted_prefix_blocks_are_not_reused(tiny: Loaded) -> None:
    # 16 blocks of 4 tokens: the unrelated long request must evict the first request's cached blocks, which
    # a later request with the first one's prefix must then recompute, not read back overwritten.
    first = tiny.ids(f"{SYSTEM} {TEXTS[0]}")
    unrelated = tiny.ids(LONG)[:50]
    again = tiny.ids(f"{SYSTEM} {TEXTS[1]}")
    arrivals = {0: [request(1, first, 8)], 12: [request(2, unrelated, 8)], 24: [request(3, again, 8)]}
    run = drive(engine(tiny, max_batch_total_tokens=64, block_size=4), arrivals)
    assert_greedy_exact(tiny, run, requests_of(arrivals))
    assert run.steps[1][-1] < 12
    assert run.steps[2][-1] < 24


def test_prompt_logprobs_exact_when_the_prefix_is_cached(tiny: Loaded) -> None:
    first = tiny.ids(f"{SYSTEM} {TEXTS[0]}")
    other = tiny.ids(f"{SYSTEM} {TEXTS[3]}")
    arrivals = {
        0: [request(1, first, 6)],
        3: [request(2, other, 6, prompt_logprobs=True), request(3, first, 6, prompt_logprobs=True)],
    }
    run = drive(engine(tiny, block_size=4), arrivals)
    assert_greedy_exact(tiny, run, requests_of(arrivals))
    for i, prompt in ((2, other), (3, first)):
        got = run.first[i].prompt_logprobs
        assert got is not None
        assert got == pytest.approx(tiny.prompt_logprobs(prompt), abs=1e-4), f"request {i}"
    assert run.first[1].prompt_logprobs is None


def test_seeded_rows_reproducible_in_any_batch_beside_exact_greedy_rows(tiny: Loaded) -> None:
    # In float64: a float32 row's logits change in their last bits with the batch beside it (the packed
    # matmuls' blocking depends on the step's token count), which now and then moves a draw at temperature
    # 1.3 to the next token. The draws themselves must not depend on the batch.
    tiny = Loaded(
        model=copy.deepcopy(tiny.model).double(),
        reference=copy.deepcopy(tiny.reference).double(),
        tokenizer=tiny.tokenizer,
    )
    hot = SamplingParams(do_sample=True, seed=11, temperature=1.3, top_p=0.95)
    narrow = SamplingParams(do_sample=True, seed=5, temperature=0.7, top_k=20, repetition_penalty=1.2)
    prompts = [tiny.ids(t) for t in TEXTS]

    def seeded() -> list[Request]:
        return [request(1, prompts[0], 20, hot), request(2, prompts[3], 20, narrow)]

    alone = {r.id: drive(engine(tiny), {0: [r]}).tokens[r.id] for r in seeded()}
    assert alone[1] != tiny.generate(prompts[0], 20), "the seeded row did not sample"
    a, b = seeded()
    batch_one = {0: [a, request(10, prompts[1], 16)], 2: [b, request(11, prompts[2], 24)]}
    c, d = seeded()
    batch_two = {
        0: [request(20, prompts[4], 8), request(21, prompts[5], 30), d],
        1: [request(22, prompts[1], 12)],
        5: [c],
    }
    for arrivals, config in ((batch_one, {}), (batch_two, {"max_batch_prefill_tokens": 8, "block_size": 4})):
        run = drive(engine(tiny, **config), arrivals)
        assert run.tokens[1] == alone[1]
        assert run.tokens[2] == alone[2]
        assert_greedy_exact(tiny, run, (r for r in requests_of(arrivals) if not r.sampling.do_sample))


def test_smollm2_matches_generate(smollm2_dir: Path) -> None:
    m = _load(smollm2_dir)
    system = m.ids(SYSTEM)
    prompts = [m.ids(f"{SYSTEM} {t}") for t in (TEXTS[1], TEXTS[3])] + [m.ids(TEXTS[2])]
    arrivals = {0: [request(1, prompts[0], 16)], 2: [request(2, prompts[1], 16), request(3, prompts[2], 16)]}
    e = engine(m, max_batch_prefill_tokens=16, block_size=4)
    run = drive(e, arrivals)
    assert_greedy_exact(m, run, requests_of(arrivals))
    assert e.cache_stats().prefix_hits >= len(system) // 4 * 4
