"""The bounded hold: wake once, release on readiness, refuse past the count or time bound. No sleeps."""

from __future__ import annotations

import asyncio

import pytest

from llm_operator.errors import OperatorError
from llm_operator.gateway.hold import (
    EndpointDeleted,
    HoldLimits,
    Holds,
    InvalidTimeoutHeader,
    TooManyWaiting,
    WakeTimeout,
    client_key,
    hold_timeout,
)
from llm_operator.gateway.routing import Route
from llm_operator.objects import Key

KEY = ("ml", "falcon")


class FakeWake:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[Key] = []
        self.fail = fail

    async def __call__(self, key: Key) -> None:
        self.calls.append(key)
        if self.fail:
            raise OperatorError("API down")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hold_timeout_header() -> None:
    limits = HoldLimits(timeout=600)
    assert hold_timeout(None, limits) == 600
    assert hold_timeout(" ", limits) == 600
    assert hold_timeout("120", limits) == 120
    assert hold_timeout("0", limits) == 0
    assert hold_timeout("3600", limits) == 600  # capped at the hold timeout: no separate maximum (#10)
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(InvalidTimeoutHeader):
            hold_timeout(bad, limits)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_waiters_share_one_wake_and_are_released_together() -> None:
    wake = FakeWake()
    holds = Holds(HoldLimits(max_waiting=10), wake, Clock())
    waiters = [asyncio.create_task(holds.wait(KEY, 60, f"peer:10.0.0.{i}")) for i in range(3)]
    await _settle()
    assert holds.waiting(KEY) == 3
    assert wake.calls == [KEY]
    holds.set_ready(KEY, True)
    await asyncio.gather(*waiters)
    assert holds.waiting(KEY) == 0


async def test_ready_endpoint_returns_at_once_without_waking() -> None:
    wake = FakeWake()
    holds = Holds(HoldLimits(), wake, Clock())
    holds.set_ready(KEY, True)
    await holds.wait(KEY, 0)
    assert wake.calls == []


async def test_count_bound_refuses_the_next_request() -> None:
    holds = Holds(HoldLimits(max_waiting=2, max_waiting_per_client=2, retry_after=7), FakeWake(), Clock())
    waiters = [asyncio.create_task(holds.wait(KEY, 60)) for _ in range(2)]
    await _settle()
    with pytest.raises(TooManyWaiting) as caught:
        await holds.wait(KEY, 60, "peer:10.0.0.9")
    assert caught.value.retry_after == 7
    assert caught.value.status == 503
    holds.set_ready(KEY, True)
    await asyncio.gather(*waiters)


async def test_time_bound_refuses_and_frees_the_slot() -> None:
    holds = Holds(HoldLimits(max_waiting=1), FakeWake(), Clock())
    with pytest.raises(WakeTimeout) as caught:
        await holds.wait(KEY, 0)
    assert "X-Scale-Up-Timeout" in str(caught.value)
    assert holds.waiting(KEY) == 0


async def test_failed_wake_is_retried_only_after_rewake_seconds() -> None:
    wake, clock = FakeWake(fail=True), Clock()
    holds = Holds(HoldLimits(rewake_seconds=15), wake, clock)
    for _ in range(2):
        with pytest.raises(WakeTimeout):
            await holds.wait(KEY, 0)
        await _settle()
    assert wake.calls == [KEY]
    clock.now += 15
    with pytest.raises(WakeTimeout):
        await holds.wait(KEY, 0)
    await _settle()
    assert wake.calls == [KEY, KEY]


async def test_after_readiness_a_new_scale_from_zero_wakes_again() -> None:
    wake = FakeWake()
    holds = Holds(HoldLimits(), wake, Clock())
    first = asyncio.create_task(holds.wait(KEY, 60))
    await _settle()
    holds.set_ready(KEY, True)
    await first
    holds.set_ready(KEY, False)  # scaled to zero again
    second = asyncio.create_task(holds.wait(KEY, 60))
    await _settle()
    assert wake.calls == [KEY, KEY]
    holds.forget(KEY)  # deleted: waiters are released to re-resolve
    await second


async def test_cancelled_waiter_frees_its_slot() -> None:
    holds = Holds(HoldLimits(max_waiting=1), FakeWake(), Clock())
    waiter = asyncio.create_task(holds.wait(KEY, 60))
    await _settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert holds.waiting(KEY) == 0
    await holds.close()


def test_the_per_client_share_defaults_to_a_quarter() -> None:
    assert HoldLimits(max_waiting=256).per_client == 64
    assert HoldLimits(max_waiting=3).per_client == 1
    assert HoldLimits(max_waiting=256, max_waiting_per_client=10).per_client == 10


def test_client_keys() -> None:
    assert client_key("s3cret", "10.0.0.1") == client_key("s3cret", "10.0.0.2")  # one credential
    assert "s3cret" not in client_key("s3cret", None)  # kept hashed
    assert client_key(None, "10.0.0.1") != client_key(None, "10.0.0.2")


async def test_one_client_cannot_take_every_slot() -> None:
    """64 requests from one client locked everyone out with scale_up_queue_full (finding 10 of #10)."""
    holds = Holds(HoldLimits(max_waiting=8, retry_after=7), FakeWake(), Clock())
    greedy = [asyncio.create_task(holds.wait(KEY, 60, "peer:10.0.0.66")) for _ in range(2)]
    await _settle()
    with pytest.raises(TooManyWaiting) as caught:
        await holds.wait(KEY, 60, "peer:10.0.0.66")
    assert "of your requests" in str(caught.value)
    assert caught.value.retry_after == 7
    other = asyncio.create_task(holds.wait(KEY, 60, "peer:10.0.0.1"))
    await _settle()
    assert holds.waiting(KEY) == 3
    holds.set_ready(KEY, True)
    await asyncio.gather(*greedy, other)


async def test_the_total_over_endpoints_is_bounded() -> None:
    holds = Holds(HoldLimits(max_held_total=2), FakeWake(), Clock())
    waiters = [asyncio.create_task(holds.wait(("ml", name), 60)) for name in ("a", "b")]
    await _settle()
    with pytest.raises(TooManyWaiting) as caught:
        await holds.wait(("ml", "c"), 60)
    assert "the gateway already holds 2 requests" in str(caught.value)
    holds.set_ready(("ml", "a"), True)
    await waiters[0]
    third = asyncio.create_task(holds.wait(("ml", "c"), 60))  # a slot came free
    await _settle()
    for name in ("b", "c"):
        holds.set_ready(("ml", name), True)
    await asyncio.gather(waiters[1], third)


class Table:
    """The routing table's view of one endpoint, as `Holds.until_ready` re-reads it."""

    def __init__(self, route: Route | None) -> None:
        self.route = route

    def __call__(self) -> Route | None:
        return self.route


async def _nothing() -> None:
    return None


async def test_a_held_request_gets_the_route_once_a_replica_is_ready() -> None:
    holds, table = Holds(HoldLimits(), FakeWake(), Clock()), Table(Route(*KEY))
    held = asyncio.create_task(holds.until_ready(KEY, table, 1060.0, "peer:a", _nothing, 3600))
    await _settle()
    assert holds.waiting(KEY) == 1
    table.route = Route(*KEY, addresses=("10.0.0.1:8080",))
    holds.set_ready(KEY, True)
    assert await held == table.route
    assert holds.waiting(KEY) == 0


async def test_a_held_request_is_kept_alive_while_it_waits() -> None:
    holds, table = Holds(HoldLimits(), FakeWake(), Clock()), Table(Route(*KEY))
    sent: list[bool] = []

    async def keepalive() -> None:
        sent.append(holds.waiting(KEY) == 1)
        if len(sent) == 3:
            table.route = Route(*KEY, addresses=("10.0.0.1:8080",))
            holds.set_ready(KEY, True)

    route = await holds.until_ready(KEY, table, 1060.0, "peer:a", keepalive, 0)
    assert route.addresses == ("10.0.0.1:8080",)
    assert sent[:3] == [True, True, True]  # sent while held (one more may go before the release is seen)
    assert holds.waiting(KEY) == 0


async def test_a_request_held_for_a_deleted_endpoint_is_refused_404() -> None:
    holds, table = Holds(HoldLimits(), FakeWake(), Clock()), Table(Route(*KEY))
    held = asyncio.create_task(holds.until_ready(KEY, table, 1060.0, "peer:a", _nothing, 3600))
    await _settle()
    table.route = None
    holds.forget(KEY)
    with pytest.raises(EndpointDeleted) as caught:
        await held
    assert (caught.value.status, caught.value.error_type) == (404, "not_found")
    assert str(caught.value) == "endpoint ml/falcon was deleted"


async def test_the_hold_deadline_is_on_the_holds_clock() -> None:
    clock = Clock()
    holds = Holds(HoldLimits(), FakeWake(), clock)
    with pytest.raises(WakeTimeout):
        await holds.until_ready(KEY, Table(Route(*KEY)), clock.now, "peer:a", _nothing, 3600)
    assert holds.waiting(KEY) == 0
