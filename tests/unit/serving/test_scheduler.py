"""The paged continuous-batching scheduler with hand-built requests and a fake step: no torch, no model."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from llm_serving.engine.blocks import BlockPool
from llm_serving.engine.request import FinishReason, Request, RequestStatus
from llm_serving.engine.scheduler import ScheduledRow, Scheduler, SchedulerConfig, SchedulerOutput
from llm_serving.sampling.params import SamplingParams, StoppingParams

BS = 4


def req(i: int, prompt: int = 4, new: int = 4, base: int = 0, logprobs: bool = False) -> Request:
    tokens = tuple(range(base, base + prompt))
    stopping = StoppingParams(max_new_tokens=new)
    return Request(i, tokens, SamplingParams(), stopping, arrival=0.0, prompt_logprobs=logprobs)


def sched(
    blocks: int = 64,
    prefill: int = 100,
    size: int = 8,
    chunked: bool = True,
    caching: bool = True,
) -> Scheduler:
    config = SchedulerConfig(prefill, size, chunked_prefill=chunked, prefix_caching=caching)
    return Scheduler(config, BlockPool(blocks, BS, prefix_caching=caching))


def step(s: Scheduler) -> SchedulerOutput:
    """Schedule, 'run' and commit; sampled rows get a token and finish at max_new_tokens."""
    out = s.schedule()
    for row in out.rows:
        assert len(row.request.blocks) * BS >= row.start + row.count  # the table covers what runs
    s.commit(out)
    for row in out.rows:
        if row.sample:
            request = row.request
            request.output_ids.append(1000 + len(request.output_ids))
            if len(request.output_ids) == request.stopping.max_new_tokens:
                request.finish(FinishReason.LENGTH)
    assert_pool_consistent(s)
    return out


def assert_pool_consistent(s: Scheduler) -> None:
    held = {b for r in s.running for b in r.blocks}
    assert s.pool.stats().used == len(held)
    assert all(not r.blocks for r in s.waiting)


def ids(rows: Iterable[ScheduledRow]) -> list[int]:
    return [r.request.id for r in rows]


def rids(requests: Iterable[Request]) -> list[int]:
    return [r.id for r in requests]


def test_admits_new_requests_every_step_and_lists_decode_rows_first() -> None:
    s = sched()
    s.add(req(1))
    first = step(s)
    assert ids(first.rows) == [1]
    assert (first.rows[0].start, first.rows[0].count, first.rows[0].sample) == (0, 4, True)
    s.add(req(2))
    second = s.schedule()
    assert ids(second.rows) == [1, 2]
    decode, prefill = second.rows
    assert decode.decode
    assert (decode.start, decode.count, decode.sample) == (4, 1, True)
    assert decode.tokens == (1000,)
    assert not prefill.decode
    assert prefill.tokens == (0, 1, 2, 3)


def test_a_decode_row_gets_a_new_block_when_its_position_starts_one() -> None:
    s = sched()
    s.add(req(1, prompt=3, new=8))
    step(s)  # positions 0..2 in block 0
    request = s.running[0]
    step(s)  # position 3: still block 0
    assert len(request.blocks) == 1
    step(s)  # position 4: a second block
    assert len(request.blocks) == 2


def test_finished_and_cancelled_rows_leave_and_release_their_blocks() -> None:
    s = sched(blocks=8, caching=False)
    for i in range(3):
        s.add(req(i))
    step(s)
    s.running[0].finish(FinishReason.EOS_TOKEN)
    assert s.cancel(2) is not None
    assert s.cancel(2) is None  # already cancelled
    assert s.cancel(99) is None
    out = s.schedule()
    assert ids(out.rows) == [1]
    assert {r.id for r in out.removed} == {0, 2}
    assert s.pool.stats().used == 2  # 1 kept its block and took one for position 4


def test_cancel_a_waiting_request() -> None:
    s = sched(size=1)
    s.add(req(1))
    s.add(req(2))
    step(s)
    cancelled = s.cancel(2)
    assert cancelled is not None
    assert cancelled.status is RequestStatus.CANCELLED
    assert not s.waiting


def test_add_refuses_a_request_that_can_never_fit_the_cache() -> None:
    s = sched(blocks=4)  # 16 slots
    s.add(req(1, prompt=8, new=8))
    with pytest.raises(ValueError, match="17 KV slots of 16"):
        s.add(req(2, prompt=8, new=9))


def test_prefill_budget_and_batch_size_limit_admission() -> None:
    s = sched(prefill=10, size=3)
    for i in range(5):
        s.add(req(i, prompt=6, base=10 * i))
    first = step(s)
    # Chunked: the budget is filled exactly, the second prompt starts with 4 of its 6 tokens.
    assert [(r.request.id, r.count) for r in first.rows] == [(0, 6), (1, 4)]
    second = step(s)
    assert [(r.request.id, r.start, r.count, r.sample) for r in second.rows] == [
        (0, 6, 1, True),
        (1, 4, 2, True),  # continued prefill ahead of new admissions
        (2, 0, 6, True),
    ]
    assert ids(s.schedule().rows) == [0, 1, 2]  # batch full: nothing else admitted
    assert rids(s.waiting) == [3, 4]


def test_a_long_prompt_is_chunked_across_steps_while_decode_rows_run_in_every_step() -> None:
    s = sched(prefill=8)
    s.add(req(1, prompt=4, new=20))
    step(s)
    long = req(2, prompt=30, new=2, base=500)
    s.add(long)
    seen = []
    while not long.output_ids:
        out = step(s)
        assert ids(out.rows)[0] == 1
        assert out.rows[0].decode
        long_row = out.rows[1]
        assert sum(r.count for r in out.rows if not r.decode) <= 8
        seen.append((long_row.start, long_row.count, long_row.sample))
    assert seen == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 6, True)]


def test_without_chunking_a_prompt_runs_whole_and_the_first_of_a_step_always_fits() -> None:
    s = sched(prefill=10, chunked=False)
    s.add(req(1, prompt=30))  # longer than the budget: admitted alone, whole
    s.add(req(2, prompt=6, base=100))
    s.add(req(3, prompt=6, base=200))
    first = step(s)
    assert [(r.request.id, r.count, r.sample) for r in first.rows] == [(1, 30, True)]
    second = s.schedule()
    assert [(r.request.id, r.count) for r in second.rows] == [(1, 1), (2, 6)]  # 3 would exceed the budget


def test_the_newest_request_is_preempted_when_blocks_run_out_and_recomputed_later() -> None:
    s = sched(blocks=4, caching=False)  # 16 slots
    s.add(req(1, prompt=4, new=8))
    s.add(req(2, prompt=4, new=8, base=100))
    s.add(req(3, prompt=4, new=8, base=200))
    step(s)
    assert rids(s.running) == [1, 2, 3]
    out = step(s)  # 1 takes the last free block for position 4; 2 needs one too: 3 is preempted
    assert rids(out.preempted) == [3]
    assert ids(out.rows) == [1, 2]
    assert rids(s.waiting) == [3]
    victim = s.waiting[0]
    assert (victim.status, victim.preemptions, victim.num_computed, victim.blocks) == (
        RequestStatus.WAITING,
        1,
        0,
        [],
    )
    assert victim.output_ids == [1000]  # what it generated is kept
    assert s.pool.stats().used == 4
    for request in s.running:
        request.finish(FinishReason.LENGTH)
    (row,) = s.schedule().rows
    assert row.request is victim
    assert victim.status is RequestStatus.RUNNING
    assert (row.start, row.count, row.sample) == (0, 5, True)
    assert row.tokens == victim.all_ids == (200, 201, 202, 203, 1000)


def test_preemption_picks_the_newest_running_request_and_requeues_it_at_the_front() -> None:
    s = sched(blocks=5, size=3, caching=False)  # 20 slots
    s.add(req(1, prompt=8, new=8))
    s.add(req(2, prompt=4, new=8, base=100))
    s.add(req(3, prompt=4, new=8, base=200))
    s.add(req(4, prompt=4, new=12, base=300))  # waits: no block left
    step(s)
    assert rids(s.running) == [1, 2, 3]
    assert rids(s.waiting) == [4]
    out = s.schedule()  # 1 (position 8) needs a block: 3, the newest, is preempted
    assert rids(out.preempted) == [3]
    assert ids(out.rows) == [1, 2]  # 2 got the block 3 released; nothing is admitted this step
    assert rids(s.waiting) == [3, 4]
    s.commit(out)
    for row in out.rows:
        row.request.output_ids.append(9)
    assert_pool_consistent(s)
    # 3 comes back first and prefills everything it had: prompt and generated token.
    s.running[0].finish(FinishReason.LENGTH)
    back = s.schedule()
    row = next(r for r in back.rows if r.request.id == 3)
    assert (row.start, row.count, row.sample) == (0, 5, True)
    assert row.tokens == (200, 201, 202, 203, 1000)


def test_recompute_after_preemption_reuses_its_cached_prefix() -> None:
    s = sched(blocks=4, prefill=100)
    s.add(req(1, prompt=8, new=8))
    s.add(req(2, prompt=7, new=8, base=100))
    step(s)
    out = s.schedule()  # 1 needs a third block: 2 is preempted
    assert rids(out.preempted) == [2]
    s.commit(out)
    s.running[0].finish(FinishReason.LENGTH)
    back = s.schedule()
    (row,) = back.rows
    assert row.request.id == 2
    assert (row.start, row.count, row.sample) == (4, 4, True)  # its first full block survived in the cache


def test_a_request_that_needs_a_block_and_is_the_newest_preempts_itself() -> None:
    s = sched(blocks=2, caching=False)
    s.add(req(1, prompt=3, new=4))
    s.add(req(2, prompt=4, new=4, base=100))
    step(s)
    out = s.schedule()  # 1 decodes position 3 in its block; 2 needs a block for position 4, none is free
    assert rids(out.preempted) == [2]
    assert ids(out.rows) == [1]
    assert s.running[0].blocks == [0]
    assert s.pool.free_count() == 1


def test_prefix_cache_hits_skip_computed_full_blocks_of_the_prompt() -> None:
    s = sched()
    s.add(req(1, prompt=10, new=2))
    step(s)
    s.add(req(2, prompt=10, new=2))  # same prompt
    s.add(req(3, prompt=8, new=2))  # exactly two blocks: the last token is always computed
    out = s.schedule()
    rows = {r.request.id: r for r in out.rows}
    assert (rows[2].start, rows[2].count) == (8, 2)
    assert (rows[3].start, rows[3].count) == (4, 4)
    assert rows[2].request.blocks[:2] == s.running[0].blocks[:2]
    stats = s.pool.stats()
    assert (stats.prefix_queries, stats.prefix_hits) == (9 + 9 + 7, 8 + 4)


def test_requests_that_want_prompt_logprobs_bypass_the_cache_and_get_targets_per_chunk() -> None:
    s = sched(prefill=4)
    s.add(req(1, prompt=8))
    step(s)
    step(s)
    s.add(req(2, prompt=8, logprobs=True))
    chunks = []
    for _ in range(3):
        row = next(r for r in step(s).rows if r.request.id == 2)
        chunks.append((row.start, row.count, row.logprob_targets))
    assert chunks == [(0, 4, (1, 2, 3, 4)), (4, 4, (5, 6, 7)), (8, 1, ())]
    assert s.pool.stats().prefix_queries == 7  # only request 1 asked


def test_a_preempted_prompt_logprobs_request_recomputes_its_logprobs() -> None:
    request = req(1, logprobs=True)
    request.prompt_logprob_values = [-1.0, -2.0]
    request.preempt()
    assert request.prompt_logprob_values == []
    request.output_ids.append(5)
    request.prompt_logprob_values = [-1.0, -2.0, -3.0]
    request.preempt()
    assert request.prompt_logprob_values == [-1.0, -2.0, -3.0]  # delivered with the first token already


def test_commit_registers_full_blocks_so_later_prompts_can_reuse_them() -> None:
    s = sched(prefill=7)
    s.add(req(1, prompt=12, new=5))
    step(s)
    assert len(s.pool.lookup(tuple(range(12)))) == 1  # 7 computed: one full block, the second lacks one
    step(s)
    assert len(s.pool.lookup(tuple(range(12)))) == 3
    for _ in range(4):
        step(s)  # positions 12..15: the generated tokens fill the fourth block
    tokens = s.running[0].all_ids
    assert len(s.pool.lookup(tokens)) == 4


def test_without_prefix_caching_nothing_is_shared() -> None:
    s = sched(caching=False)
    s.add(req(1, prompt=10))
    step(s)
    s.add(req(2, prompt=10))
    row = s.schedule().rows[-1]
    assert (row.start, row.count) == (0, 10)
    assert s.pool.stats().prefix_queries == 0


def test_fail_and_abort_all_release_every_block() -> None:
    s = sched(blocks=8, size=3)
    for i in range(4):
        s.add(req(i, prompt=6, base=10 * i))
    step(s)
    assert rids(s.waiting) == [3]
    s.fail([s.running[1], s.waiting[0]])
    assert rids(s.running) == [0, 2]
    assert not s.waiting
    open_requests = s.abort_all()
    assert rids(open_requests) == [0, 2]
    assert s.pool.stats().used == 0
    assert s.pool.free_count() == 8
    assert not s.running
    assert not s.waiting


def test_without_chunking_a_prompt_waits_until_blocks_hold_all_of_it() -> None:
    s = sched(blocks=4, chunked=False, caching=False)
    s.add(req(1, prompt=8, new=4))
    s.add(req(2, prompt=9, new=4, base=100))  # needs 3 blocks, 2 are free
    assert ids(step(s).rows) == [1]
    s.running[0].finish(FinishReason.LENGTH)
    assert [(r.request.id, r.count) for r in s.schedule().rows] == [(2, 9)]


class PagedStore:
    """A fake paged KV cache: each slot remembers the token written there; the 'model' reads it back.

    The next token is a function of the KV contents of every position, so a wrong block table, a reused
    block with the wrong contents or an overwritten shared block changes the generated tokens.
    """

    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], int] = {}

    def run(self, s: Scheduler, out: SchedulerOutput) -> None:
        owners: dict[int, int] = {}
        for request in s.running:
            for block in request.blocks:
                owners[block] = owners.get(block, 0) + 1
        for row in out.rows:
            request = row.request
            for position, token in enumerate(row.tokens, row.start):
                block = request.blocks[position // BS]
                assert owners[block] == 1, "a shared block is written"
                self.slots[block, position % BS] = token
            if row.sample:
                end = row.start + row.count
                context = [self.slots[request.blocks[p // BS], p % BS] for p in range(end)]
                request.output_ids.append(next_token(context))
                if len(request.output_ids) == request.stopping.max_new_tokens:
                    request.finish(FinishReason.LENGTH)


def next_token(context: Iterable[int]) -> int:
    value = 7
    for token in context:
        value = (value * 31 + token) % 1009
    return value % 50


def expected_output(request: Request) -> list[int]:
    ids_ = list(request.prompt_ids)
    out: list[int] = []
    while len(out) < request.stopping.max_new_tokens:
        out.append(next_token(ids_))
        ids_.append(out[-1])
    return out


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_random_workloads_on_a_tiny_cache_generate_what_a_lone_run_would(
    chunked: bool, caching: bool, seed: int
) -> None:
    rng = random.Random(seed)
    s = sched(blocks=12, prefill=10, size=6, chunked=chunked, caching=caching)  # 48 slots
    store = PagedStore()
    prefixes = [tuple(rng.randrange(50) for _ in range(9)) for _ in range(3)]
    pending = []
    for i in range(40):
        suffix = tuple(rng.randrange(50) for _ in range(rng.randrange(8)))
        prompt = rng.choice(prefixes)[: rng.randrange(1, 10)] + suffix
        pending.append(
            Request(i, prompt, SamplingParams(), StoppingParams(rng.randrange(1, 24)), arrival=0.0)
        )
    every = list(pending)
    cancelled = set()
    for _ in range(2000):
        for _ in range(rng.randrange(3)):
            if pending:
                s.add(pending.pop(0))
        if rng.random() < 0.03 and s.running:
            victim = rng.choice(s.running)
            if not victim.done:
                cancelled.add(victim.id)
                s.cancel(victim.id)
        out = s.schedule()
        prefill = [r.count for r in out.rows if not r.decode]
        assert sum(prefill) <= 10 or (not chunked and len(prefill) == 1)
        assert len(out.rows) <= len(s.running) <= 6
        assert [r.decode for r in out.rows] == sorted((r.decode for r in out.rows), reverse=True)
        store.run(s, out)
        s.commit(out)
        assert_pool_consistent(s)
        if not pending and not s.waiting and all(r.done for r in s.running):
            break
    else:
        pytest.fail("the workload did not finish")
    s.schedule()
    assert s.pool.stats().used == 0
    assert s.pool.free_count() == s.pool.num_blocks
    for request in every:
        if request.id not in cancelled:
            assert request.output_ids == expected_output(request), request.id
    assert sum(r.preemptions for r in every) > 0  # the cache is small enough to force preemptions
    assert (s.pool.stats().prefix_hits > 0) is caching
