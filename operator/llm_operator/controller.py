"""Workers that drain the queue of endpoint keys into `reconcile`, with retries, while this replica leads.

Watch events (from kopf, see handlers) only add keys; a worker always reads the current state, so missed or
coalesced events cost nothing but latency. Failures map to retries in one place: `retry_delay`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import aiohttp
from prometheus_client import Counter, Gauge, Histogram

from llm_operator.errors import OperatorError
from llm_operator.kube import ConflictError, Kube
from llm_operator.leader import LeaderElector
from llm_operator.objects import Key
from llm_operator.reconcile import Outcome, reconcile
from llm_operator.settings import Settings
from llm_operator.workqueue import WorkQueue

log = logging.getLogger("llm_operator.controller")

RECONCILES = Counter("llm_operator_reconciles_total", "Reconcile passes by result", ["result"])
RECONCILE_SECONDS = Histogram("llm_operator_reconcile_seconds", "Duration of one reconcile pass")
QUEUE_DEPTH = Gauge("llm_operator_queue_depth", "Endpoints waiting for a reconcile pass")

BASE_DELAY, MAX_DELAY = 0.5, 60.0
RESYNC_SECONDS = 600.0
"""Every endpoint gets a full pass this often (drift no event showed, a rotated API key Secret)."""


def backoff(failures: int) -> float:
    """Seconds before the next try after `failures` failures in a row."""
    return float(min(MAX_DELAY, BASE_DELAY * 2 ** max(0, failures - 1)))


def retry_delay(error: Exception, failures: int) -> float | None:
    """Seconds until the next try after `failures` failures in a row, or None: wait for a change."""
    if isinstance(error, ConflictError):
        return 0.0 if failures <= 3 else BASE_DELAY
    if isinstance(error, OperatorError) and not error.retryable:
        return None
    return backoff(failures)


def next_pass(outcome: Outcome, hub_failures: int) -> float | None:
    """Seconds until this endpoint's next pass without an event: a back-off while its revision cannot be
    resolved (`hub_failures` in a row), soon while a replica loads (its progress), else None."""
    if outcome.hub_retry:
        return backoff(hub_failures)
    return outcome.requeue_after


class Controller:
    """Owns the queue, the set of known endpoints and the workers."""

    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        *,
        workers: int = 16,
        elector: LeaderElector | None = None,
        identity: str = "llm-operator",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        resync_seconds: float = RESYNC_SECONDS,
    ) -> None:
        self.kube, self.settings, self.workers = kube, settings, workers
        self.resync_seconds = resync_seconds
        self.elector, self.identity, self.clock = elector, identity, clock
        self.queue: WorkQueue[Key] = WorkQueue()
        self.known: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._hub_failures: dict[Key, int] = {}
        self.http: aiohttp.ClientSession | None = None
        """The session for the Hub and the pods' `/status` (made by `run`)."""
        self._full: set[Key] = set()  # keys whose next pass must apply the children, not only read them
        self.leading = elector.leading if elector else asyncio.Event()
        if elector:
            elector.on_start = self.resync
        else:
            self.leading.set()

    def endpoint_seen(
        self, namespace: str, name: str, *, deleted: bool = False, reconcile: bool = True, wake: bool = False
    ) -> None:
        """An LLMEndpoint watch event; `wake`: a gateway asks for a replica (a quick pass, not a full one)."""
        key = (namespace, name)
        if deleted:
            self.known.discard(key)
            self._failures.pop(key, None)
            self._hub_failures.pop(key, None)
            self._full.discard(key)
            return
        self.known.add(key)
        if reconcile or wake:
            self._want(key, children=reconcile)

    def child_seen(self, namespace: str, endpoint: str, *, drifted: bool = True) -> None:
        """A watch event of a child or pod labelled with its endpoint's name; `drifted`: someone may have
        changed what the operator applies (else only status may have moved)."""
        self._want((namespace, endpoint), children=drifted)

    def resync(self) -> None:
        """Queue every known endpoint for a full pass (on becoming leader, and periodically)."""
        for key in self.known:
            self._want(key, children=True)

    def _want(self, key: Key, *, children: bool) -> None:
        if children:
            self._full.add(key)
        self.queue.add(key)

    async def _work(self) -> None:
        while True:
            await self.leading.wait()
            key = await self.queue.get()
            if not self.leading.is_set():
                self.queue.done(key)
                self.queue.add(key)
                continue
            try:
                await self._pass(key)
            finally:
                self.queue.done(key)
                QUEUE_DEPTH.set(len(self.queue))

    async def _pass(self, key: Key) -> None:
        namespace, name = key
        ref = {"namespace": namespace, "endpoint": name}
        started = time.monotonic()
        children = key in self._full
        self._full.discard(key)
        try:
            outcome = await reconcile(
                self.kube,
                namespace,
                name,
                self.settings,
                self.clock,
                self.identity,
                children=children,
                http=self.http,
            )
        except Exception as error:
            self._full.add(key)  # retry in full
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = retry_delay(error, failures)
            RECONCILES.labels(result="conflict" if isinstance(error, ConflictError) else "error").inc()
            level = logging.DEBUG if isinstance(error, ConflictError) else logging.ERROR
            log.log(
                level,
                "reconcile failed: %s",
                error,
                extra={**ref, "retry_in": delay, "failures": failures},
                exc_info=not isinstance(error, OperatorError),
            )
            if delay is not None:
                self.queue.add_after(key, delay)
            return
        finally:
            RECONCILE_SECONDS.observe(time.monotonic() - started)
        self._failures.pop(key, None)
        RECONCILES.labels(result="ok").inc()
        hub_failures = self._hub_failures[key] = self._hub_failures.get(key, 0) + 1
        if not outcome.hub_retry:
            del self._hub_failures[key]
        if (delay := next_pass(outcome, hub_failures)) is not None:
            if outcome.hub_retry:
                self._full.add(key)  # the resolved commit is rendered by a full pass
            self.queue.add_after(key, delay)
        if outcome.status is not None and (
            outcome.status_written or outcome.pruned or outcome.scaled_to is not None
        ):
            log.info(
                "reconciled",
                extra={
                    **ref,
                    "phase": outcome.status.phase,
                    "ready": outcome.status.ready,
                    "pruned": list(outcome.pruned),
                    "scaled_to": outcome.scaled_to,
                },
            )

    async def run(self) -> None:
        """Workers, the elector and the periodic resync, until cancelled."""
        self.http = aiohttp.ClientSession()
        tasks = [asyncio.create_task(self._work(), name=f"worker-{i}") for i in range(self.workers)]
        if self.elector:
            tasks.append(asyncio.create_task(self.elector.run(), name="leader-election"))
        try:
            while True:
                await asyncio.sleep(self.resync_seconds)
                self.resync()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.http.close()
            if self.elector:
                await self.elector.release()
