"""Reading a request body within its bounds: size, time, the budget of all buffered bodies."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message

from llm_operator.gateway.limits import (
    BodiesOverBudget,
    BodyBudget,
    BodyTooLarge,
    BodyTooSlow,
    ClientGone,
    ServerLimits,
    read_body,
)

LIMITS = ServerLimits(max_body_bytes=10, body_seconds=5)


class Client:
    """An ASGI receive callable that yields `messages`, then waits forever (a client that sends no more)."""

    def __init__(self, *messages: Message) -> None:
        self.messages = list(messages)

    async def __call__(self) -> Message:
        if not self.messages:
            await asyncio.Event().wait()
        return self.messages.pop(0)


def _chunk(body: bytes, more: bool = False) -> Message:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_a_body_in_chunks_is_read_whole_and_stays_taken_from_the_budget() -> None:
    budget = BodyBudget(100)
    body = await read_body(Client(_chunk(b"hello ", more=True), _chunk(b"you")), LIMITS, budget)
    assert (body, budget.used) == (b"hello you", 9)


async def test_each_bound_refuses_with_its_own_error_and_gives_back_what_it_took() -> None:
    budget = BodyBudget(100)
    with pytest.raises(BodyTooLarge) as large:
        await read_body(Client(_chunk(b"123456", more=True), _chunk(b"78901")), LIMITS, budget)
    assert (large.value.status, large.value.error_type) == (413, "payload_too_large")
    assert large.value.headers() == {"connection": "close"}
    assert budget.used == 0

    with pytest.raises(BodiesOverBudget) as full:
        await read_body(Client(_chunk(b"123456")), LIMITS, BodyBudget(4))
    assert (full.value.status, full.value.error_type) == (503, "overloaded")
    assert full.value.headers() == {"connection": "close", "retry-after": "1"}

    with pytest.raises(BodyTooSlow) as slow:
        await read_body(Client(_chunk(b"12", more=True)), ServerLimits(body_seconds=0), budget)
    assert (slow.value.status, slow.value.error_type) == (408, "request_timeout")
    assert budget.used == 0

    with pytest.raises(ClientGone) as gone:
        await read_body(Client(_chunk(b"12", more=True), {"type": "http.disconnect"}), LIMITS, budget)
    assert (gone.value.status, gone.value.error_type) == (499, "client_closed")
    assert budget.used == 0
