"""Holding requests while an endpoint wakes: bounded in count and time, one wake at a time per endpoint.

The first request that finds an endpoint without a ready replica triggers the wake at once; later ones wait
on the same event. A request is refused with a `HoldRefused` (answered 503 + Retry-After) when the gateway
already holds `max_held_total` requests, the endpoint `max_waiting`, or the same client (see `client_key`)
its share of the endpoint's; or when no replica becomes ready within its timeout. `Holds.until_ready` is
one held request's loop: wait, re-read its route, keep an SSE answer alive meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from llm_operator.errors import OperatorError
from llm_operator.gateway.errors import GatewayError
from llm_operator.gateway.routing import Route
from llm_operator.objects import Key

log = logging.getLogger("llm_operator.gateway.hold")
_Slot = TypeVar("_Slot")


@dataclass(frozen=True)
class HoldLimits:
    """Bounds of the hold (each per gateway replica)."""

    max_waiting: int = 64
    """Held requests per endpoint; one more is refused at once."""
    max_waiting_per_client: int | None = None
    """Held requests per endpoint from one client; None: a quarter of `max_waiting`, at least 1."""
    max_held_total: int = 1024
    """Held requests over all endpoints (each keeps its body in memory)."""
    timeout: float = 300.0
    """Seconds a request waits for a replica: the default, and the most X-Scale-Up-Timeout may ask for."""
    retry_after: int = 30
    """Seconds suggested in Retry-After when a request is refused."""
    rewake_seconds: float = 15.0
    """A new request re-sends the wake when the last one is at least this old (e.g. it failed)."""

    @property
    def per_client(self) -> int:
        """The per-client bound in effect."""
        if self.max_waiting_per_client is not None:
            return self.max_waiting_per_client
        return max(1, self.max_waiting // 4)


def client_key(token: str | None, peer: str | None) -> str:
    """Who a held request counts against: its verified bearer token (hashed, never kept) when it has one,
    else its address."""
    if token is not None:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    return f"peer:{peer or ''}"


class InvalidTimeoutHeader(GatewayError, ValueError):
    """X-Scale-Up-Timeout is not a non-negative number of seconds (answered 400)."""

    status = 400
    error_type = "validation"


class EndpointDeleted(GatewayError):
    """The endpoint was deleted while its request was held."""

    status = 404
    error_type = "not_found"

    def __init__(self, key: Key) -> None:
        super().__init__(f"endpoint {key[0]}/{key[1]} was deleted")


class HoldRefused(GatewayError):
    """The request cannot be held any longer; answered 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)}


class TooManyWaiting(HoldRefused):
    """The endpoint already holds as many requests as it may."""

    error_type = "scale_up_queue_full"


class WakeTimeout(HoldRefused):
    """No replica became ready within the request's timeout."""

    error_type = "scale_up_timeout"


class Draining(HoldRefused):
    """This gateway replica is shutting down (`Holds.drain`): retried, the request goes to another one."""

    error_type = "gateway_draining"


def hold_timeout(header: str | None, limits: HoldLimits) -> float:
    """Seconds to hold a request: X-Scale-Up-Timeout when given (capped at the hold timeout), else that."""
    if header is None or not header.strip():
        return limits.timeout
    try:
        seconds = float(header)
    except ValueError:
        raise InvalidTimeoutHeader(
            f"X-Scale-Up-Timeout must be a number of seconds, got {header!r}"
        ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidTimeoutHeader(f"X-Scale-Up-Timeout must be a non-negative number, got {header!r}")
    return min(seconds, limits.timeout)


class Holds:
    """Per-endpoint readiness events, held-request counts and the wake trigger (`wake` raises an
    OperatorError when it fails; a later request sends it again)."""

    def __init__(
        self,
        limits: HoldLimits,
        wake: Callable[[Key], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits, self._wake, self._clock = limits, wake, clock
        self._ready: dict[Key, asyncio.Event] = {}
        self._waiting: dict[Key, int] = {}
        self._by_client: dict[tuple[Key, str], int] = {}
        self._total = 0
        self._woken_at: dict[Key, float] = {}
        self._wakes: dict[Key, asyncio.Task[None]] = {}
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """Refuse every held request now, and every later one, with `Draining` (the gateway is stopping)."""
        self._draining.set()

    def _event(self, key: Key) -> asyncio.Event:
        return self._ready.setdefault(key, asyncio.Event())

    def set_ready(self, key: Key, ready: bool) -> None:
        """The routing table now has (or lacks) a ready address for the endpoint."""
        event = self._event(key)
        if ready:
            event.set()
            self._woken_at.pop(key, None)
        else:
            event.clear()

    def forget(self, key: Key) -> None:
        """The endpoint is gone: release its waiters (they re-resolve and find it unknown)."""
        if event := self._ready.pop(key, None):
            event.set()
        self._woken_at.pop(key, None)

    def waiting(self, key: Key) -> int:
        """Requests held for the endpoint now."""
        return self._waiting.get(key, 0)

    def _maybe_wake(self, key: Key) -> None:
        if key in self._wakes:
            return
        last = self._woken_at.get(key)
        now = self._clock()
        if last is not None and now - last < self.limits.rewake_seconds:
            return
        self._woken_at[key] = now
        task = asyncio.create_task(self._run_wake(key), name=f"wake-{key[0]}/{key[1]}")
        self._wakes[key] = task

    async def _run_wake(self, key: Key) -> None:
        try:
            await self._wake(key)
        except (OperatorError, OSError) as error:
            # the API call failed, or the token could not be read: a request tries after rewake_seconds
            log.warning("wake of %s/%s failed: %s", *key, error)
        finally:
            self._wakes.pop(key, None)

    def _refusal(self, key: Key, client: str) -> TooManyWaiting | None:
        limits, name = self.limits, f"{key[0]}/{key[1]}"
        if self._total >= limits.max_held_total:
            why = f"the gateway already holds {limits.max_held_total} requests for endpoints scaling up"
        elif self.waiting(key) >= limits.max_waiting:
            why = f"endpoint {name} is scaling up and already holds {limits.max_waiting} requests"
        elif self._by_client.get((key, client), 0) >= limits.per_client:
            why = f"endpoint {name} is scaling up and already holds {limits.per_client} of your requests"
        else:
            return None
        return TooManyWaiting(why + "; retry later", limits.retry_after)

    async def wait(self, key: Key, within: float, client: str = "") -> None:
        """Return once the endpoint has a ready replica (within `within` seconds); wake it first if needed.
        `client` is the request's `client_key`."""
        event = self._event(key)
        if event.is_set():
            return
        if self._draining.is_set():
            raise Draining("this gateway replica is shutting down; retry", 1)
        if (refused := self._refusal(key, client)) is not None:
            self._maybe_wake(key)
            raise refused
        slot = (key, client)
        self._waiting[key] = self.waiting(key) + 1
        self._by_client[slot] = self._by_client.get(slot, 0) + 1
        self._total += 1
        try:
            self._maybe_wake(key)
            async with asyncio.timeout(within):
                await _either(event, self._draining)
            if not event.is_set():
                raise Draining("this gateway replica is shutting down before a replica was ready; retry", 1)
        except TimeoutError:
            raise WakeTimeout(
                f"endpoint {key[0]}/{key[1]} is scaling up: no replica was ready within {within:g}s; "
                "retry later or send a longer X-Scale-Up-Timeout",
                self.limits.retry_after,
            ) from None
        finally:
            self._total -= 1
            _release(self._waiting, key)
            _release(self._by_client, slot)

    async def until_ready(
        self,
        key: Key,
        lookup: Callable[[], Route | None],
        deadline: float,
        client: str,
        keepalive: Callable[[], Awaitable[None]],
        every: float,
    ) -> Route:
        """Hold one request until `lookup` gives the endpoint's route with a ready address, by `deadline`
        (on this clock), awaiting `keepalive` every `every` seconds meanwhile. Raises what `wait` raises,
        and EndpointDeleted once `lookup` finds no route."""
        route = lookup()
        while route is None or not route.addresses:
            waiter = asyncio.ensure_future(self.wait(key, deadline - self._clock(), client))
            try:
                while not (await asyncio.wait({waiter}, timeout=every))[0]:
                    await keepalive()
            finally:
                waiter.cancel()
            waiter.result()
            route = lookup()
            if route is None:
                raise EndpointDeleted(key)
        return route

    async def close(self) -> None:
        """Cancel wakes in flight."""
        for task in list(self._wakes.values()):
            task.cancel()
        await asyncio.gather(*self._wakes.values(), return_exceptions=True)


async def _either(*events: asyncio.Event) -> None:
    """Return once one of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _release(counts: dict[_Slot, int], slot: _Slot) -> None:
    counts[slot] -= 1
    if not counts[slot]:
        del counts[slot]
