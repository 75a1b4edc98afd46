"""Continuous-batching scheduler over a paged KV cache: which tokens of which requests run in the next step.

Each step runs one decode token per generating request, continues partly computed prompts in chunks
and admits waiting requests FIFO while the prefill budget, the batch size and the free blocks allow.
When a running request needs a block and none is free, the newest running request is preempted: its
blocks are released and it goes back to the front of the queue, to be recomputed (prompt and generated
tokens) later. Pure: no torch, no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from llm_serving.engine.blocks import BlockPool
from llm_serving.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets of one step."""

    max_batch_prefill_tokens: int  # prompt tokens per step (TGI's flag); longer prompts span steps
    max_batch_size: int
    chunked_prefill: bool = True  # False: a prompt runs whole in one step (the first admission always fits)
    prefix_caching: bool = True


@dataclass(frozen=True)
class ScheduledRow:
    """The tokens one request runs this step."""

    request: Request
    start: int  # request.num_computed before this step
    count: int  # this step runs all_ids[start:start + count]
    sample: bool  # start + count == len(all_ids): the last token's logits give the next token
    logprob_targets: tuple[int, ...]  # prompt_logprobs requests: prompt tokens at positions start+1 ..
    decode: bool = False  # one token of a request that has generated before (not a prompt chunk)

    @property
    def tokens(self) -> tuple[int, ...]:
        """The token ids this row runs."""
        return self.request.tokens(self.start, self.start + self.count)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan."""

    rows: tuple[ScheduledRow, ...]  # decode rows first, then continued prefills, then new admissions
    removed: tuple[Request, ...]  # finished or cancelled since the last step (blocks already released)
    preempted: tuple[Request, ...]  # sent back to the front of the queue this step (blocks released)

    @property
    def empty(self) -> bool:
        return not self.rows


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks holding the KV of `tokens` positions."""
    return -(-tokens // block_size)


def is_decoding(request: Request) -> bool:
    """It has generated tokens and only the last one lacks KV."""
    return bool(request.output_ids) and request.num_tokens - request.num_computed == 1


def chunk_size(remaining: int, budget: int, chunked: bool, first: bool) -> int:
    """Prompt tokens to run now out of `remaining`, given the step's prefill budget left (0: none).

    Without chunking a prompt runs whole, within the budget unless it is the step's first prefill.
    """
    if chunked:
        return max(0, min(remaining, budget))
    return remaining if remaining <= budget or first else 0


def logprob_targets(request: Request, start: int, count: int) -> tuple[int, ...]:
    """The prompt token following each position run, within the prompt; only before any token is generated."""
    if not request.prompt_logprobs or request.output_ids:
        return ()
    prompt = request.prompt_ids
    return prompt[start + 1 : min(start + count, len(prompt) - 1) + 1]


def plan_row(request: Request, count: int, decode: bool) -> ScheduledRow:
    start = request.num_computed
    return ScheduledRow(
        request=request,
        start=start,
        count=count,
        sample=start + count == request.num_tokens,
        logprob_targets=logprob_targets(request, start, count),
        decode=decode,
    )


class Scheduler:
    """FIFO admission by free blocks, chunked prefill beside decode, preemption of the newest request."""

    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest first

    def add(self, request: Request) -> None:
        capacity = self.pool.num_blocks * self.pool.block_size
        if request.reserved_tokens > capacity:
            raise ValueError(f"request {request.id} needs {request.reserved_tokens} KV slots of {capacity}")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def cancel(self, request_id: int) -> Request | None:
        """Cancel a waiting or running request, releasing its blocks; a running one is `removed` next step."""
        for request in (*self.waiting, *self.running):
            if request.id == request_id and not request.done:
                self.waiting = deque(r for r in self.waiting if r is not request)
                self._release(request)
                request.cancel()
                return request
        return None

    def schedule(self) -> SchedulerOutput:
        """Drop finished rows, plan the running requests (preempting when blocks run out), then admit."""
        removed = self._drop_done()
        budget = self.config.max_batch_prefill_tokens
        decode: list[ScheduledRow] = []
        chunks: list[ScheduledRow] = []
        preempted: list[Request] = []
        index = 0
        while index < len(self.running):
            request = self.running[index]
            decoding = is_decoding(request)
            want = 1 if decoding else self._chunk(request.num_tokens - request.num_computed, budget)
            if want == 0:
                index += 1
                continue
            count = min(want, self._capacity(request.blocks, request.num_computed))
            if count < (1 if self.config.chunked_prefill else want):
                preempted.append(self._preempt_newest())
                continue
            self._grow(request, request.num_computed + count)
            (decode if decoding else chunks).append(plan_row(request, count, decoding))
            budget -= 0 if decoding else count
            index += 1
        # A step that had to preempt admits nothing: the freed blocks go to the running requests first.
        admitted = [] if preempted else self._admit(budget)
        rows = (*decode, *chunks, *admitted)
        return SchedulerOutput(rows=rows, removed=removed, preempted=tuple(preempted))

    def commit(self, out: SchedulerOutput) -> None:
        """After a successful step: the rows' tokens have KV; newly full blocks enter the prefix cache."""
        size = self.pool.block_size
        for row in out.rows:
            request = row.request
            full_before = request.num_computed // size
            request.num_computed += row.count
            if self.config.prefix_caching and request.blocks and request.num_computed // size > full_before:
                self.pool.register(request.all_ids[: request.num_computed], request.blocks, request.adapter)

    def fail(self, requests: Iterable[Request]) -> None:
        """Drop these requests (their step failed) from the queue and the batch, releasing their blocks."""
        ids = set()
        for request in requests:
            self._release(request)
            ids.add(request.id)
        self.running = [r for r in self.running if r.id not in ids]
        self.waiting = deque(r for r in self.waiting if r.id not in ids)

    def abort_all(self) -> list[Request]:
        """Remove every request, releasing all blocks; returns those still open."""
        everyone = [*self.running, *self.waiting]
        for request in everyone:
            self._release(request)
        self.running = []
        self.waiting.clear()
        return [r for r in everyone if not r.done]

    def _admit(self, budget: int) -> list[ScheduledRow]:
        rows: list[ScheduledRow] = []
        while self.waiting and len(self.running) < self.config.max_batch_size:
            row = self._try_admit(self.waiting[0], budget)
            if row is None:
                break
            request = self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            rows.append(row)
            budget -= row.count
        return rows

    def _try_admit(self, request: Request, budget: int) -> ScheduledRow | None:
        """Plan the first chunk of a waiting request after its cached prefix; None if it does not fit now."""
        if budget <= 0:
            return None
        use_cache = self.config.prefix_caching and not request.prompt_logprobs
        # The last token is always computed: its logits give the next token.
        prefix = request.all_ids[:-1] if use_cache else ()
        hit = self.pool.lookup(prefix, request.adapter) if use_cache else []
        start = len(hit) * self.pool.block_size
        want = self._chunk(request.num_tokens - start, budget)
        capacity = (len(hit) + self.pool.available_with(hit)) * self.pool.block_size - start
        count = min(want, capacity)
        if want == 0 or count < (1 if self.config.chunked_prefill else want):
            return None
        if use_cache:
            request.blocks = self.pool.match_prefix(prefix, request.adapter)
        request.num_computed = start
        self._grow(request, start + count)
        return plan_row(request, count, decode=False)

    def _chunk(self, remaining: int, budget: int) -> int:
        first = budget == self.config.max_batch_prefill_tokens
        return chunk_size(remaining, budget, self.config.chunked_prefill, first)

    def _capacity(self, blocks: list[int], computed: int) -> int:
        """Positions after `computed` that its blocks plus every allocatable block can hold."""
        return (len(blocks) + self.pool.free_count()) * self.pool.block_size - computed

    def _grow(self, request: Request, end: int) -> None:
        """Allocate blocks until the request's table covers positions [0, end)."""
        for _ in range(blocks_for(end, self.pool.block_size) - len(request.blocks)):
            request.blocks.append(self.pool.allocate())

    def _preempt_newest(self) -> Request:
        request = self.running.pop()
        self._release(request)
        request.preempt()
        self.waiting.appendleft(request)
        return request

    def _release(self, request: Request) -> None:
        self.pool.release(request.blocks)
        request.blocks = []

    def _drop_done(self) -> tuple[Request, ...]:
        removed = tuple(r for r in self.running if r.done)
        for request in removed:
            self._release(request)
        self.running = [r for r in self.running if not r.done]
        return removed
