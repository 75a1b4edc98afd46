"""A replica that fails: the real gateway (uvicorn on loopback) before real HTTP servers on loopback that
write part of an answer and then drop the connection (reset or plain close), close before answering, answer
503 (draining) or stall; the gateway tries another replica while nothing reached the client."""

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
from prometheus_client import generate_latest

from llm_operator.apikey import key_hash
from llm_operator.gateway.app import Gateway, GatewaySettings
from llm_operator.gateway.routing import Access, Route, RoutingTable
from llm_operator.gateway.upstream import UpstreamSettings
from llm_operator.objects import Key
from tests.gateway.support import serve

KEY = ("ml", "falcon")
EVENTS = [
    b'data: {"index": 1, "token": {"id": 1, "text": " a", "logprob": -0.1, "special": false}}\n\n',
    b'data: {"index": 2, "token": {"id": 2, "text": " b", "logprob": -0.1, "special": false}}\n\n',
]


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class DyingReplica:
    """An HTTP/1.1 server playing a failing replica; by default it answers 200 with the first part of a body,
    then drops the connection.

    `how`: "reset" (RST, as when the process is killed with unread data) or "close" (FIN mid-body);
    `kind`: "sse" (chunked text/event-stream), "chunked" (chunked JSON) or "length" (Content-Length JSON);
    "silent" answers nothing and closes once it has read the request; "unavailable" answers 503 as a
    draining uvicorn does; "stale_key" answers 401 as a serving pod started before its key was rotated;
    "ok" answers 200 in full; "stall" sends SSE headers and then nothing, "mute"
    nothing at all (both until `stop` is set); "once" answers the first request of a connection in full
    and keeps it open, then closes it once it has read the next one (as a replica closing an idle
    connection just as it is reused).
    """

    def __init__(self, kind: str = "sse") -> None:
        self.how = "reset"
        self.kind = kind
        self.requests = 0
        self.stop = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.kind == "once":
            await self._read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
            await self._read_request(reader)
            writer.close()
            return
        await self._read_request(reader)
        await self._answer(writer)

    async def _read_request(self, reader: asyncio.StreamReader) -> None:
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

    async def _answer(self, writer: asyncio.StreamWriter) -> None:
        if self.kind in ("unavailable", "stale_key", "ok"):
            status, body = {
                "unavailable": (b"503 Service Unavailable", b"draining"),
                "stale_key": (b"401 Unauthorized", b'{"error": "invalid bearer token"}'),
                "ok": (b"200 OK", b"{}"),
            }[self.kind]
            head = b"HTTP/1.1 %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (status, len(body))
            writer.write(head + body)
            await writer.drain()
            writer.close()
            return
        if self.kind in ("stall", "mute"):
            if self.kind == "stall":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
                writer.write(b"transfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 30)
            writer.close()
            return
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


READ_TIMEOUT = 1.0


@dataclass
class Rig:
    gateway: Gateway
    replica: DyingReplica
    client: httpx.AsyncClient
    servers: list[asyncio.Server]
    replicas: list[DyingReplica]

    async def metric(self, code: int) -> str:
        return self._sample(f'llm_gateway_requests_total{{code="{code}",endpoint="falcon",namespace="ml"}}')

    def in_flight(self) -> str:
        return self._sample('llm_gateway_requests_in_flight{endpoint="falcon",namespace="ml"}')

    def _sample(self, series: str) -> str:
        text = generate_latest(self.gateway.metrics.registry).decode()
        return next((row.split()[-1] for row in text.splitlines() if row.startswith(series)), "absent")

    async def add_replica(self, replica: DyingReplica) -> None:
        """Start `replica` as one more ready address of the endpoint."""
        server = await asyncio.start_server(replica.handle, "127.0.0.1", 0)
        self.servers.append(server)
        self.replicas.append(replica)
        route = self.gateway.table.get(KEY)
        assert route is not None
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self.gateway.set_table(RoutingTable({KEY: Route(*KEY, addresses=(*route.addresses, address))}))


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async def never(_: Key) -> None:
        raise AssertionError("the endpoint is ready: no wake")

    gateway = Gateway(GatewaySettings(upstream=UpstreamSettings(read_timeout=READ_TIMEOUT)), never)
    gateway.set_table(RoutingTable({KEY: Route(*KEY)}))
    replica = DyingReplica()
    rig = None
    try:
        async with serve(gateway) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            rig = Rig(gateway, replica, client, [], [])
            await rig.add_replica(replica)
            yield rig
    finally:
        for each in rig.replicas if rig else ():
            each.stop.set()
        for server in rig.servers if rig else ():
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


@pytest.mark.parametrize("first", ["unavailable", "silent"])
async def test_a_draining_or_closing_replica_is_passed_over(rig: Rig, first: str) -> None:
    """A replica's 503 (uvicorn draining) or a connection closed before any answer byte goes to another
    replica; only connect errors were tried again before (finding 11 of #10)."""
    rig.replica.kind = first
    await rig.add_replica(DyingReplica("ok"))
    answers = [
        await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "hi"}) for _ in range(4)
    ]
    assert [a.status_code for a in answers] == [200] * 4
    assert rig.replica.requests >= 1  # it was tried first at least once
    assert rig.replicas[1].requests == 4
    assert await rig.metric(200) == "4.0"


@pytest.mark.parametrize("access", ["protected", "public"])
async def test_a_replica_with_the_old_key_is_passed_over_while_the_pods_roll(
    rig: Rig, access: Access
) -> None:
    """A key rotation rolls the pods; until then an old replica refuses the new key the gateway checked, so
    the request goes to a replica that has it. A public endpoint's 401 is the replica's own answer."""
    rig.replica.kind = "stale_key"
    await rig.add_replica(DyingReplica("ok"))
    route = rig.gateway.table.get(KEY)
    assert route is not None
    hashed = key_hash("uid-1", "new") if access == "protected" else None
    new_route = Route(*KEY, access=access, api_key_hash=hashed, addresses=route.addresses)
    rig.gateway.set_table(RoutingTable({KEY: new_route}))
    headers = {"authorization": "Bearer new"}
    answers = [
        await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "hi"}, headers=headers)
        for _ in range(4)
    ]
    if access == "protected":
        assert [a.status_code for a in answers] == [200] * 4
        assert rig.replicas[1].requests == 4
    else:
        assert sorted(a.status_code for a in answers) == [200, 200, 401, 401]  # round robin, no retry


async def test_the_only_replicas_503_is_passed_through(rig: Rig) -> None:
    rig.replica.kind = "unavailable"
    answer = await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "hi"})
    assert (answer.status_code, answer.content) == (503, b"draining")
    assert rig.replica.requests == 1


async def test_a_stream_that_stalls_ends_with_an_error_event(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """No read timeout before: a replica on a lost node held the request, counted in flight, forever."""
    rig.replica.kind = "stall"
    async with rig.client.stream(
        "POST", "/endpoints/ml/falcon/generate_stream", json={"inputs": "hi"}
    ) as answer:
        assert answer.status_code == 200
        received = b"".join([chunk async for chunk in answer.aiter_raw()])
    error = json.loads(received.strip().removeprefix(b"data: "))
    assert error["error_type"] == "incomplete_generation"
    _no_asgi_exception(caplog)
    assert await rig.metric(502) == "1.0"
    assert rig.in_flight() == "0.0"


async def test_a_replica_that_never_answers_is_a_504(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.replica.kind = "mute"
    answer = await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "hi"})
    assert (answer.status_code, answer.json()["error_type"]) == (504, "upstream_timeout")
    assert rig.replica.requests == 1  # not sent again: it may be running
    _no_asgi_exception(caplog)
    assert rig.in_flight() == "0.0"


async def test_a_pooled_connection_closed_by_the_replica_is_tried_again(rig: Rig) -> None:
    """A reset or closed pooled connection reached the client as an error before any byte was sent."""
    rig.replica.kind = "once"
    for _ in range(2):
        answer = await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "hi"})
        assert (answer.status_code, answer.content) == (200, b"{}")
    assert rig.replica.requests == 3  # the second request twice: on the reused connection, then a new one
