"""Runs the engine on its own thread and streams each request's events to asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from llm_serving.engine.engine import Engine
from llm_serving.engine.request import Request
from llm_serving.errors import EngineDeadError, GenerationError, OverloadedError, ServingError
from llm_serving.outputs import Event, FailureEvent, StepStats, TokenEvent
from llm_serving.sampling.params import SamplingParams, StoppingParams

log = logging.getLogger("llm_serving.engine")

# What the engine thread hands a request's stream: its events, or the error that ends it.
Delivery = list[Event] | ServingError
Sink = Callable[[Delivery], None]


@dataclass(frozen=True)
class _Add:
    request: Request
    sink: Sink


@dataclass(frozen=True)
class _Cancel:
    request_id: int


@dataclass(frozen=True)
class _Abort:
    """End every open request with a fresh `error()` (the drain period is over)."""

    error: Callable[[], ServingError]


class _Stop:
    pass


Command = _Add | _Cancel | _Abort | _Stop


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
        self._sinks: dict[int, Sink] = {}
        self.in_flight = 0
        self.failure: str | None = None
        """Why the engine thread stopped serving (None while it is alive)."""
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    @property
    def queue_size(self) -> int:
        return len(self._engine.scheduler.waiting)

    @property
    def batch_size(self) -> int:
        return len(self._engine.scheduler.running)

    def _loop(self) -> None:
        """The engine thread: serve until `_Stop`. An exception that escapes the engine's own handling (a bug,
        or a failed tensor-parallel step: the ranks are out of step) leaves the engine dead: every open
        request ends with `EngineDeadError`, later ones are refused with it, and `/health` answers 503."""
        try:
            self._serve()
        except BaseException as exc:  # even SystemExit: a silently dead thread would hang every request
            log.exception("engine thread failed; the server is unhealthy from now on")
            self.failure = f"{type(exc).__name__}: {exc}"
            self._refuse_until_stopped()

    def _serve(self) -> None:
        while True:
            block = not self._engine.has_work
            while True:
                try:
                    command = self._inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if isinstance(command, _Stop):
                    self._shutdown()
                    return
                if isinstance(command, _Add):
                    self._sinks[command.request.id] = command.sink
                    self._engine.add(command.request)
                elif isinstance(command, _Abort):
                    self._end_all(command.error)
                else:
                    self._engine.cancel(command.request_id)
                    self._sinks.pop(command.request_id, None)
            events, stats = self._engine.step()
            self._dispatch(events)
            if stats is not None and self._on_step is not None:
                self._on_step(stats)

    def _shutdown(self) -> None:
        """Stop the other ranks' loops; a failure here only leaves them to torchrun."""
        try:
            self._engine.runner.shutdown()
        except Exception:
            log.exception("could not stop the other ranks")

    def _end_all(self, error: Callable[[], ServingError]) -> None:
        """Drop every request from the engine and hand each open one `error()`."""
        with contextlib.suppress(Exception):
            self._engine.abort_all()
        for sink in self._sinks.values():
            _deliver(sink, error())
        self._sinks.clear()

    def _refuse_until_stopped(self) -> None:
        """After a failure: end the open requests, answer new ones with the error, exit on `_Stop`."""
        assert self.failure is not None
        failure = self.failure
        self._end_all(lambda: EngineDeadError(failure))
        while not isinstance(command := self._inbox.get(), _Stop):
            if isinstance(command, _Add):
                _deliver(command.sink, EngineDeadError(failure))

    def _dispatch(self, events: list[Event]) -> None:
        grouped: dict[int, list[Event]] = {}
        for event in events:
            grouped.setdefault(event.request_id, []).append(event)
        for request_id, group in grouped.items():
            last = group[-1]
            final = isinstance(last, FailureEvent) or last.finish_reason is not None
            sink = self._sinks.pop(request_id, None) if final else self._sinks.get(request_id)
            if sink is not None:
                _deliver(sink, group)

    async def generate(
        self,
        prompt_ids: tuple[int, ...],
        sampling: SamplingParams,
        stopping: StoppingParams,
        prompt_logprobs: bool,
        adapter: str | None = None,
    ) -> AsyncGenerator[TokenEvent, None]:
        """Admit a request (or raise `OverloadedError`) and yield its tokens (with LoRA `adapter`, None: the
        base model); closing cancels it."""
        if self.failure is not None:
            raise EngineDeadError(self.failure)
        if self.in_flight >= self._max_concurrent:
            raise OverloadedError()
        self.in_flight += 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Delivery] = asyncio.Queue()

        def sink(delivery: Delivery) -> None:
            loop.call_soon_threadsafe(events.put_nowait, delivery)

        request = Request(
            id=next(self._ids),
            prompt_ids=prompt_ids,
            sampling=sampling,
            stopping=stopping,
            arrival=time.monotonic(),
            prompt_logprobs=prompt_logprobs,
            adapter=adapter,
        )
        finished = False
        self._inbox.put(_Add(request, sink))
        try:
            while not finished:
                delivery = await events.get()
                if isinstance(delivery, ServingError):
                    finished = True
                    raise delivery
                for event in delivery:
                    if isinstance(event, FailureEvent):
                        finished = True
                        raise GenerationError(event.message)
                    finished = event.finish_reason is not None
                    yield event
        finally:
            self.in_flight -= 1
            if not finished:
                self._inbox.put(_Cancel(request.id))

    def abort_all(self, error: Callable[[], ServingError]) -> None:
        """End every open request with a fresh `error()` (thread-safe)."""
        self._inbox.put(_Abort(error))

    def stop(self) -> None:
        """Stop the engine thread (and the other ranks' loops)."""
        self._inbox.put(_Stop())
        self._thread.join(timeout=30)


def _deliver(sink: Sink, delivery: Delivery) -> None:
    """Hand `delivery` to a request's stream; a stream whose event loop is gone needs nothing."""
    with contextlib.suppress(RuntimeError):
        sink(delivery)
