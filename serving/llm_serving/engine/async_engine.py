"""Runs the engine on its own thread and streams each request's events to asyncio."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from llm_serving.engine.engine import Engine, Event, FailureEvent, StepStats, TokenEvent
from llm_serving.engine.request import Request
from llm_serving.errors import GenerationError, OverloadedError
from llm_serving.sampling.params import SamplingParams, StoppingParams


@dataclass(frozen=True)
class _Add:
    request: Request
    sink: Callable[[list[Event]], None]


@dataclass(frozen=True)
class _Cancel:
    request_id: int


class _Stop:
    pass


Command = _Add | _Cancel | _Stop


class AsyncEngine:
    """Thread-safe front of the engine: admission limit, per-request queues, cancellation."""

    def __init__(
        self,
        engine: Engine,
        max_concurrent_requests: int,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self._engine = engine
        self._max_concurrent = max_concurrent_requests
        self._on_step = on_step
        self._inbox: queue.Queue[Command] = queue.Queue()
        self._ids = itertools.count(1)
        self._sinks: dict[int, Callable[[list[Event]], None]] = {}
        self.in_flight = 0
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    @property
    def queue_size(self) -> int:
        return len(self._engine.scheduler.waiting)

    @property
    def batch_size(self) -> int:
        return len(self._engine.scheduler.running)

    def _loop(self) -> None:
        while True:
            block = not self._engine.has_work
            while True:
                try:
                    command = self._inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if isinstance(command, _Stop):
                    self._engine.runner.shutdown()
                    return
                if isinstance(command, _Add):
                    self._sinks[command.request.id] = command.sink
                    self._engine.add(command.request)
                else:
                    self._engine.cancel(command.request_id)
                    self._sinks.pop(command.request_id, None)
            events, stats = self._engine.step()
            self._dispatch(events)
            if stats is not None and self._on_step is not None:
                self._on_step(stats)

    def _dispatch(self, events: list[Event]) -> None:
        grouped: dict[int, list[Event]] = {}
        for event in events:
            grouped.setdefault(event.request_id, []).append(event)
        for request_id, group in grouped.items():
            last = group[-1]
            final = isinstance(last, FailureEvent) or last.finish_reason is not None
            sink = self._sinks.pop(request_id, None) if final else self._sinks.get(request_id)
            if sink is not None:
                sink(group)

    async def generate(
        self,
        prompt_ids: tuple[int, ...],
        sampling: SamplingParams,
        stopping: StoppingParams,
        prompt_logprobs: bool,
    ) -> AsyncGenerator[TokenEvent, None]:
        """Admit a request (or raise `OverloadedError`) and yield its tokens; closing cancels it."""
        if self.in_flight >= self._max_concurrent:
            raise OverloadedError()
        self.in_flight += 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[list[Event]] = asyncio.Queue()

        def sink(group: list[Event]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, group)

        request = Request(
            id=next(self._ids),
            prompt_ids=prompt_ids,
            sampling=sampling,
            stopping=stopping,
            arrival=time.monotonic(),
            prompt_logprobs=prompt_logprobs,
        )
        finished = False
        self._inbox.put(_Add(request, sink))
        try:
            while not finished:
                for event in await events.get():
                    if isinstance(event, FailureEvent):
                        finished = True
                        raise GenerationError(event.message)
                    finished = event.finish_reason is not None
                    yield event
        finally:
            self.in_flight -= 1
            if not finished:
                self._inbox.put(_Cancel(request.id))

    def stop(self) -> None:
        """Stop the engine thread (and the other ranks' loops)."""
        self._inbox.put(_Stop())
        self._thread.join(timeout=30)
