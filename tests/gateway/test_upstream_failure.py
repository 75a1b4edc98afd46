"""A replica that dies mid-answer: the real gateway (uvicorn on loopback) before a real HTTP server on
loopback that writes part of its answer and then drops the connection (reset or plain close)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from llm_operator.gateway.app import Gateway, GatewaySettings
from llm_operator.gateway.routing import Key, Route, RoutingTable
from tests.gateway.support import serve

KEY = ("ml", "falcon")
EVENTS = [
    b'data: {"index": 1, "token": {"id": 1, "text": " a", "logprob": -0.1, "special": false}}\n\n',
    b'data: {"index": 2, "token": {"id": 2, "text": " b", "logprob": -0.1, "special": false}}\n\n',
]


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class DyingReplica:
    """An HTTP/1.1 server that answers 200 with the first part of a body, then drops the connection.

    `how`: "reset" (RST, as when the process is killed with unread data) or "close" (FIN mid-body);
    `kind`: "sse" (chunked text/event-stream), "chunked" (chunked JSON) or "length" (Content-Length JSON);
    "silent" answers nothing and closes once it has read the request.
    """

    def __init__(self) -> None:
        self.how = "reset"
        self.kind = "sse"
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        await reader.readexactly(length)
        self.requests += 1
        if self.kind == "sse":
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            writer.write(b"".join(_chunk(event) for event in EVENTS))
        elif self.kind == "chunked":
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            writer.write(_chunk(b'{"generated_text": "hel'))
        elif self.kind == "length":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n")
            writer.write(b'{"generated_text": "hel')
        await writer.drain()
        await asyncio.sleep(0.2)  # the gateway relays what came so far
        if self.how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()
        else:
            writer.close()


@dataclass
class Rig:
    gateway: Gateway
    replica: DyingReplica
    client: httpx.AsyncClient

    async def metric(self, code: int) -> str:
        text = (await self.client.get("/metrics")).text
        line = f'llm_gateway_requests_total{{code="{code}",endpoint="falcon",namespace="ml"}}'
        return next((row.split()[-1] for row in text.splitlines() if row.startswith(line)), "absent")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async def never(_: Key) -> None:
        raise AssertionError("the endpoint is ready: no wake")

    replica = DyingReplica()
    server = await asyncio.start_server(replica.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gateway = Gateway(GatewaySettings(), never)
    gateway.set_table(RoutingTable({KEY: Route(*KEY, addresses=(f"127.0.0.1:{port}",))}))
    try:
        async with serve(gateway) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield Rig(gateway, replica, client)
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()


def _no_asgi_exception(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r.getMessage() for r in caplog.records]
    assert not [m for m in logged if "Exception in ASGI application" in m], logged
    assert not [r for r in caplog.records if r.exc_info], logged


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_stream_cut_short_ends_with_an_error_event(
    rig: Rig, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rig.replica.how = how
    async with rig.client.stream(
        "POST", "/endpoints/ml/falcon/generate_stream", json={"inputs": "hi"}
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        received = b"".join([chunk async for chunk in answer.aiter_raw()])  # ends cleanly: no read error
    events = [e for e in received.split(b"\n\n") if e]
    assert [e + b"\n\n" for e in events[:2]] == EVENTS
    assert len(events) == 3
    error = json.loads(events[2].removeprefix(b"data: "))
    assert set(error) == {"error", "error_type"}
    assert error["error_type"] == "incomplete_generation"
    _no_asgi_exception(caplog)
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and r.name == "llm_operator.gateway"
    ]
    assert len(warnings) == 1
    assert await rig.metric(502) == "1.0"
    assert await rig.metric(200) == "absent"


async def test_chunked_body_cut_short_ends_cleanly(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.replica.kind = "chunked"
    answer = await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "hi"})
    assert answer.status_code == 200
    assert answer.content == b'{"generated_text": "hel'
    _no_asgi_exception(caplog)
    assert [r.levelno for r in caplog.records if r.name == "llm_operator.gateway"] == [logging.WARNING]
    assert await rig.metric(502) == "1.0"


async def test_body_with_a_length_cut_short_is_not_passed_off_as_whole(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.replica.kind = "length"
    with pytest.raises(httpx.RemoteProtocolError):
        await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "hi"})
    _no_asgi_exception(caplog)
    assert await rig.metric(502) == "1.0"


async def test_replica_closing_before_answering_is_a_502(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.replica.kind = "silent"
    answer = await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "hi"})
    assert answer.status_code == 502
    assert answer.json()["error_type"] == "upstream_failed"
    assert rig.replica.requests == 1  # not sent again: it may have run
    _no_asgi_exception(caplog)
    assert await rig.metric(502) == "1.0"
