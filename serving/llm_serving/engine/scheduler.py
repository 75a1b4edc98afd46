"""Continuous-batching scheduler: which requests run in the next step. Pure: no torch, no I/O."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llm_serving.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets for one running batch."""

    max_batch_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_size: int


@dataclass(frozen=True)
class SchedulerOutput:
    """One step: rows of the previous batch to keep (indices), the requests they hold, and new prefills.

    The next batch's rows are `decode` followed by `prefill`, in that order.
    """

    keep: tuple[int, ...]
    decode: tuple[Request, ...]
    prefill: tuple[Request, ...]
    removed: tuple[Request, ...]

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def rows(self) -> tuple[Request, ...]:
        return self.decode + self.prefill


class Scheduler:
    """FIFO admission into a running batch under token and size budgets, at every step."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        if request.reserved_tokens > self.config.max_batch_total_tokens:
            raise ValueError(f"request {request.id} can never fit the batch token budget")
        self.waiting.append(request)

    def cancel(self, request_id: int) -> Request | None:
        """Cancel a waiting or running request; running rows leave the batch at the next `schedule()`."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                request.cancel()
                return request
        for request in self.running:
            if request.id == request_id and not request.done:
                request.cancel()
                return request
        return None

    @property
    def reserved_tokens(self) -> int:
        return sum(r.reserved_tokens for r in self.running if not r.done)

    def schedule(self) -> SchedulerOutput:
        """Drop finished rows, then admit waiting requests while the budgets allow."""
        keep = tuple(i for i, r in enumerate(self.running) if not r.done)
        removed = tuple(r for r in self.running if r.done)
        decode = tuple(self.running[i] for i in keep)
        budget = self.config.max_batch_total_tokens - sum(r.reserved_tokens for r in decode)
        prefill_budget = self.config.max_batch_prefill_tokens
        size = len(decode)
        admitted: list[Request] = []
        while self.waiting and size < self.config.max_batch_size:
            head = self.waiting[0]
            prompt = len(head.prompt_ids)
            # The first prefill of a step is always admitted so a long prompt cannot starve.
            if head.reserved_tokens > budget or (admitted and prompt > prefill_budget):
                break
            self.waiting.popleft()
            head.status = RequestStatus.RUNNING
            admitted.append(head)
            budget -= head.reserved_tokens
            prefill_budget -= prompt
            size += 1
        self.running = [*decode, *admitted]
        return SchedulerOutput(keep=keep, decode=decode, prefill=tuple(admitted), removed=removed)

    def abort_all(self) -> list[Request]:
        """Remove every request (after an engine failure); returns those still open."""
        open_requests = [r for r in (*self.running, *self.waiting) if not r.done]
        self.running = []
        self.waiting.clear()
        return open_requests
