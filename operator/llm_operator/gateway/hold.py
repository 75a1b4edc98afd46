"""Holding requests while an endpoint wakes: bounded in count and time per endpoint, one wake at a time.

The first request that finds an endpoint without a ready replica triggers the wake at once; later ones wait
on the same event. A request is refused with a `HoldRefused` (answered 503 + Retry-After) when the endpoint
already has `max_waiting` held requests or no replica becomes ready within its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from llm_operator.gateway.errors import GatewayError
from llm_operator.gateway.routing import Key

log = logging.getLogger("llm_operator.gateway.hold")
TIMEOUT_HEADER = "x-scale-up-timeout"


@dataclass(frozen=True)
class HoldLimits:
    """Bounds of the hold, per endpoint."""

    max_waiting: int = 256
    """Held requests per endpoint (per gateway replica); one more is refused at once."""
    timeout: float = 600.0
    """Seconds a request waits for a replica when it sends no X-Scale-Up-Timeout header."""
    max_timeout: float = 3600.0
    """Upper bound on what X-Scale-Up-Timeout may ask for."""
    retry_after: int = 30
    """Seconds suggested in Retry-After when a request is refused."""
    rewake_seconds: float = 15.0
    """A new request re-sends the wake when the last one is at least this old (e.g. it failed)."""


class InvalidTimeoutHeader(GatewayError, ValueError):
    """X-Scale-Up-Timeout is not a non-negative number of seconds (answered 400)."""

    status = 400
    error_type = "validation"


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


def hold_timeout(header: str | None, limits: HoldLimits) -> float:
    """Seconds to hold a request: X-Scale-Up-Timeout when given (capped at max_timeout), else the default."""
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
    return min(seconds, limits.max_timeout)


class Holds:
    """Per-endpoint readiness events, held-request counts and the wake trigger."""

    def __init__(
        self,
        limits: HoldLimits,
        wake: Callable[[Key], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits, self._wake, self._clock = limits, wake, clock
        self._ready: dict[Key, asyncio.Event] = {}
        self._waiting: dict[Key, int] = {}
        self._woken_at: dict[Key, float] = {}
        self._wakes: dict[Key, asyncio.Task[None]] = {}

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
        except Exception as error:  # the next request tries again after rewake_seconds
            log.warning("wake of %s/%s failed: %s", *key, error)
        finally:
            self._wakes.pop(key, None)

    async def wait(self, key: Key, within: float) -> None:
        """Return once the endpoint has a ready replica (within `within` seconds); wake it first if needed."""
        event = self._event(key)
        if event.is_set():
            return
        if self.waiting(key) >= self.limits.max_waiting:
            self._maybe_wake(key)
            raise TooManyWaiting(
                f"endpoint {key[0]}/{key[1]} is scaling up and already holds {self.limits.max_waiting} "
                "requests; retry later",
                self.limits.retry_after,
            )
        self._waiting[key] = self.waiting(key) + 1
        try:
            self._maybe_wake(key)
            async with asyncio.timeout(within):
                await event.wait()
        except TimeoutError:
            raise WakeTimeout(
                f"endpoint {key[0]}/{key[1]} is scaling up: no replica was ready within {within:g}s; "
                "retry later or send a longer X-Scale-Up-Timeout",
                self.limits.retry_after,
            ) from None
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]

    async def close(self) -> None:
        """Cancel wakes in flight."""
        for task in list(self._wakes.values()):
            task.cancel()
        await asyncio.gather(*self._wakes.values(), return_exceptions=True)
