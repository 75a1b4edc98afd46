"""The synchronous engine: schedule -> run the model -> sample -> detokenize -> stop, once per step."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch

from llm_serving.detokenize import IncrementalDetokenizer
from llm_serving.engine.blocks import BlockStats
from llm_serving.engine.request import FinishReason, Request
from llm_serving.engine.runner import ModelRunner, RowPlan, StepLogits, StepPlan
from llm_serving.engine.scheduler import ScheduledRow, Scheduler, SchedulerOutput
from llm_serving.outputs import Event, FailureEvent, StepStats, TokenEvent, TokenInfo
from llm_serving.sampling.device import DeviceSampler, sample_rows
from llm_serving.sampling.logits import RowContext
from llm_serving.sampling.masks import Constraints, PendingMasks
from llm_serving.sampling.sampler import choose, make_generator
from llm_serving.sampling.stopping import check_stop

log = logging.getLogger("llm_serving.engine")


def row_plan(row: ScheduledRow) -> RowPlan:
    """The runner's plain-data view of a scheduled row."""
    return RowPlan(
        tokens=row.tokens,
        start=row.start,
        blocks=tuple(row.request.blocks),
        sample=row.sample,
        logprob_targets=row.logprob_targets,
        adapter=row.request.adapter,
    )


class Engine:
    """Owns the scheduler and the runner; every call happens on one thread. With a `sampler` (CUDA) the
    sampled rows are chosen on the device (watermarked ones on the CPU), each running request holding one of
    its slots from its first sampled token until it leaves the running set."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        scheduler: Scheduler,
        eos_ids: Collection[int],
        clock: Callable[[], float] = time.monotonic,
        sampler: DeviceSampler | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.eos_ids = frozenset(eos_ids)
        self.special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)
        self._clock = clock
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._generators: dict[int, torch.Generator | None] = {}
        self._scheduled_at: dict[int, float] = {}
        self._constraints = Constraints(tokenizer)
        self._refused: list[Event] = []  # requests whose grammar did not compile, told at the next step
        self._last_cache = scheduler.pool.stats()
        self._sampler = sampler
        self._slots: dict[int, int] = {}  # request id -> its device sampler slot
        self._free_slots = list(range(scheduler.config.max_batch_size))[::-1]

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    @property
    def max_batch_total_tokens(self) -> int:
        """KV cache capacity in tokens (what `/info` reports)."""
        return self.scheduler.pool.num_blocks * self.scheduler.pool.block_size

    def cache_stats(self) -> BlockStats:
        return self.scheduler.pool.stats()

    def add(self, request: Request) -> None:
        """Queue a request; ValueError when it can never fit the KV cache."""
        if request.adapter is not None and request.adapter not in self.runner.adapters:
            self._refused.append(FailureEvent(request.id, f"LoRA adapter {request.adapter!r} is not loaded"))
            return
        self.scheduler.add(request)
        if request.sampling.grammar is not None:
            error = self._constraints.add(request.id, request.sampling.grammar)
            if error is not None:
                self.scheduler.cancel(request.id)
                self._refused.append(FailureEvent(request.id, error))
                return
        self._detok[request.id] = IncrementalDetokenizer(self.tokenizer, request.prompt_ids)
        self._generators[request.id] = make_generator(request.sampling.seed)

    def cancel(self, request_id: int) -> None:
        if self.scheduler.cancel(request_id) is not None:
            self._forget(request_id)

    def abort_all(self) -> list[int]:
        """Drop every request; returns the ids of those still open."""
        aborted = [r.id for r in self.scheduler.abort_all()]
        for request_id in list(self._slots):
            self._release_slot(request_id)
        self._detok.clear()
        self._generators.clear()
        self._scheduled_at.clear()
        self._constraints.clear()
        self._refused.clear()
        return aborted

    def _forget(self, request_id: int) -> None:
        self._detok.pop(request_id, None)
        self._generators.pop(request_id, None)
        self._scheduled_at.pop(request_id, None)
        self._constraints.forget(request_id)
        self._release_slot(request_id)

    def _release_slot(self, request_id: int) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            assert self._sampler is not None
            self._sampler.release(slot)
            self._free_slots.append(slot)

    def _slot(self, request: Request) -> int | None:
        """The device sampler slot of a running request (admitted at its first sampled row since it started
        running); None without a device sampler or for a watermarked request."""
        if self._sampler is None or not self._sampler.supports(request.sampling):
            return None
        slot = self._slots.get(request.id)
        if slot is None:
            slot = self._free_slots.pop()
            self._sampler.admit(slot, request.sampling, request.prompt_ids, request.output_ids)
            self._slots[request.id] = slot
        return slot

    def _token(self, token: int, text: str, logprob: float) -> TokenInfo:
        return TokenInfo(id=token, text=text, logprob=logprob, special=token in self.special_ids)

    def step(self) -> tuple[list[Event], StepStats | None]:
        """Run one step; returns the events for every row and the step's statistics (None when nothing
        changed). On a single rank a failure ends the affected requests with a `FailureEvent` and the
        engine goes on; under tensor parallelism (the ranks are out of step) it raises. Requests refused
        since the last step (a grammar that does not compile) end with a `FailureEvent` first."""
        refused, self._refused = self._refused, []
        events, stats = self._step()
        return refused + events, stats

    def _step(self) -> tuple[list[Event], StepStats | None]:
        start = self._clock()
        try:
            out = self.scheduler.schedule()
        except Exception as exc:
            if not self.runner.alone:
                raise
            log.exception("scheduling failed; failing every request")
            return [FailureEvent(i, _message(exc)) for i in self.abort_all()], None
        for request in out.removed:
            self._forget(request.id)
        for request in out.preempted:  # its counts are rebuilt when it runs again
            self._release_slot(request.id)
        if not out.rows:
            changed = out.removed or out.preempted
            return [], self._stats(out, start) if changed else None
        for row in out.rows:
            self._scheduled_at.setdefault(row.request.id, start)
        try:
            masks = self._constraints.start([row.request.id for row in out.rows if row.sample])
            result = self.runner.execute(StepPlan(tuple(row_plan(row) for row in out.rows)))
            self.scheduler.commit(out)
            events = self._emit(out, result, masks)
        except Exception as exc:
            if not self.runner.alone:
                raise
            log.exception("engine step failed; failing its %d request(s)", len(out.rows))
            failed = [row.request for row in out.rows]
            self.scheduler.fail(failed)
            for request in failed:
                self._forget(request.id)
            return [FailureEvent(r.id, _message(exc)) for r in failed], self._stats(out, start, failed=True)
        return events, self._stats(out, start)

    def _emit(self, out: SchedulerOutput, result: StepLogits, masks: PendingMasks) -> list[Event]:
        """Record prompt log-probs, sample the rows that end a sequence (constrained rows within their
        grammar's mask), append, detokenize, stop."""
        for row, values in zip(out.rows, result.prompt_logprobs, strict=True):
            if row.logprob_targets:
                # Positions from `start` on are (re)computed: a recomputed chunk replaces what it covers.
                del row.request.prompt_logprob_values[row.start :]
                row.request.prompt_logprob_values.extend(values)
        sampled = [row.request for row in out.rows if row.sample]
        if not sampled:
            self.runner.step_done()
            return []
        contexts = [RowContext(r.sampling, r.prompt_ids, r.output_ids) for r in sampled]
        generators = [self._generators.get(r.id) for r in sampled]
        if self._sampler is None:
            choices = choose(result.logits, contexts, generators, masks.result())
        else:
            slots = [self._slot(r) for r in sampled]
            choices = sample_rows(self._sampler, result.logits, contexts, slots, generators, masks.result())
        self.runner.step_done()  # the step's GPU work is over: what follows, up to the next step, is the gap
        events: list[Event] = []
        for request, choice in zip(sampled, choices, strict=True):
            request.output_ids.append(choice.token)
            detok = self._detok[request.id]
            piece = detok.push(choice.token)
            reason = check_stop(
                choice.token, len(request.output_ids), detok.text, piece, request.stopping, self.eos_ids
            )
            if self._constraints.advance(request.id, choice.token) and reason is not FinishReason.LENGTH:
                reason = FinishReason.EOS_TOKEN  # the grammar is complete: only EOS may follow
            if reason is not None:
                request.finish(reason)
            top = tuple(self._token(t, self.tokenizer.decode([t]), lp) for t, lp in choice.top)
            first = len(request.output_ids) == 1
            events.append(
                TokenEvent(
                    request_id=request.id,
                    token=self._token(choice.token, piece, choice.logprob),
                    top=top,
                    finish_reason=reason,
                    prompt_logprobs=(
                        list(request.prompt_logprob_values) if first and request.prompt_logprobs else None
                    ),
                    queued=self._scheduled_at[request.id] - request.arrival if first else None,
                )
            )
        return events

    def _stats(self, out: SchedulerOutput, start: float, failed: bool = False) -> StepStats:
        cache = self.scheduler.pool.stats()
        last, self._last_cache = self._last_cache, cache
        decode = sum(1 for row in out.rows if row.decode)
        return StepStats(
            queue_size=len(self.scheduler.waiting),
            batch_size=len(self.scheduler.running),
            rows=len(out.rows),
            batch_tokens=sum(row.count for row in out.rows),
            prefill_rows=len(out.rows) - decode,
            decode_rows=decode,
            duration=self._clock() - start,
            kv_tokens=cache.used * cache.block_size,
            kv_usage=cache.usage,
            prefix_queries=cache.prefix_queries - last.prefix_queries,
            prefix_hits=cache.prefix_hits - last.prefix_hits,
            preemptions=len(out.preempted),
            failed=failed,
            running_adapters=_adapters(self.scheduler.running),
            waiting_adapters=_adapters(self.scheduler.waiting),
        )


def _adapters(requests: Iterable[Request]) -> tuple[str, ...]:
    """The LoRA adapters of `requests`, each once, in first-seen order."""
    return tuple(dict.fromkeys(r.adapter for r in requests if r.adapter is not None))


def _message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
