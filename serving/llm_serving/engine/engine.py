"""The synchronous engine: schedule -> run the model -> sample -> detokenize -> stop, once per step."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

from llm_serving.detokenize import IncrementalDetokenizer
from llm_serving.engine.request import FinishReason, Request
from llm_serving.engine.runner import ModelRunner, StepPlan
from llm_serving.engine.scheduler import Scheduler, SchedulerOutput
from llm_serving.sampling.logits import RowContext
from llm_serving.sampling.sampler import choose, make_generator
from llm_serving.sampling.stopping import check_stop


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request; the last one carries the finish reason."""

    request_id: int
    token: TokenInfo
    top: tuple[TokenInfo, ...]
    finish_reason: FinishReason | None
    prompt_logprobs: list[float] | None = None
    queued: float | None = None


@dataclass(frozen=True)
class FailureEvent:
    """The step that held this request ran out of memory; the engine goes on."""

    request_id: int
    message: str


Event = TokenEvent | FailureEvent


@dataclass(frozen=True)
class StepStats:
    """What one step did, for metrics."""

    queue_size: int
    batch_size: int
    batch_tokens: int
    prefill_rows: int
    decode_rows: int
    duration: float


class Engine:
    """Owns the scheduler and the runner; every call happens on one thread."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        scheduler: Scheduler,
        eos_ids: Collection[int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.eos_ids = frozenset(eos_ids)
        self.special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)
        self._clock = clock
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._generators: dict[int, torch.Generator | None] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def add(self, request: Request) -> None:
        self.scheduler.add(request)
        self._detok[request.id] = IncrementalDetokenizer(self.tokenizer, request.prompt_ids)
        self._generators[request.id] = make_generator(request.sampling.seed)

    def cancel(self, request_id: int) -> None:
        if self.scheduler.cancel(request_id) is not None:
            self._forget(request_id)

    def _forget(self, request_id: int) -> None:
        self._detok.pop(request_id, None)
        self._generators.pop(request_id, None)

    def _token(self, token: int, text: str, logprob: float) -> TokenInfo:
        return TokenInfo(id=token, text=text, logprob=logprob, special=token in self.special_ids)

    def step(self) -> tuple[list[Event], StepStats | None]:
        """Run one step; returns the events for every row and the step's statistics."""
        out = self.scheduler.schedule()
        for request in out.removed:
            self._forget(request.id)
        if out.empty:
            if out.removed:
                self.runner.execute(StepPlan(keep=(), decode_tokens=(), prompts=(), prompt_logprobs=()))
            return [], None
        start = self._clock()
        try:
            events = self._run(out, start)
        except torch.OutOfMemoryError as exc:
            # The one failure a single rank recovers from: fail this batch, keep serving. Anything else (and
            # any failure under tensor parallelism, where the ranks are out of step) ends the engine.
            if not self.runner.alone:
                raise
            self.runner.reset()
            failed = self.scheduler.abort_all()
            for request in failed:
                self._forget(request.id)
            return [FailureEvent(r.id, f"{type(exc).__name__}: {exc}") for r in failed], None
        stats = StepStats(
            queue_size=len(self.scheduler.waiting),
            batch_size=len(out.rows),
            batch_tokens=sum(len(r.prompt_ids) + len(r.output_ids) for r in out.rows),
            prefill_rows=len(out.prefill),
            decode_rows=len(out.decode),
            duration=self._clock() - start,
        )
        return events, stats

    def _run(self, out: SchedulerOutput, start: float) -> list[Event]:
        plan = StepPlan(
            keep=out.keep,
            decode_tokens=tuple(r.output_ids[-1] for r in out.decode),
            prompts=tuple(r.prompt_ids for r in out.prefill),
            prompt_logprobs=tuple(r.prompt_logprobs for r in out.prefill),
        )
        result = self.runner.execute(plan)
        rows = out.rows
        contexts = [RowContext(r.sampling, r.prompt_ids, r.output_ids) for r in rows]
        choices = choose(result.logits, contexts, [self._generators.get(r.id) for r in rows])
        events: list[Event] = []
        for i, (request, choice) in enumerate(zip(rows, choices, strict=True)):
            if request.done:
                continue
            request.output_ids.append(choice.token)
            detok = self._detok[request.id]
            piece = detok.push(choice.token)
            reason = check_stop(
                choice.token, len(request.output_ids), detok.text, piece, request.stopping, self.eos_ids
            )
            if reason is not None:
                request.finish(reason)
            top = tuple(self._token(t, self.tokenizer.decode([t]), lp) for t, lp in choice.top)
            first = i >= len(out.decode) and len(request.output_ids) == 1
            events.append(
                TokenEvent(
                    request_id=request.id,
                    token=self._token(choice.token, piece, choice.logprob),
                    top=top,
                    finish_reason=reason,
                    prompt_logprobs=result.prompt_logprobs[i - len(out.decode)] if first else None,
                    queued=start - request.arrival if first else None,
                )
            )
        return events
