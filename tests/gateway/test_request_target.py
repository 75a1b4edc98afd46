"""What a request may make the gateway do: the real gateway (uvicorn on loopback, with the protocol it runs
in production) before loopback upstreams that record the raw request line they get, and a victim server
that nothing may reach. Raw sockets send what an HTTP client would refuse to (issue #10, findings 1-3, 10).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client import generate_latest
from starlette.types import Receive, Scope, Send

from llm_operator.gateway.app import Gateway, GatewaySettings
from llm_operator.gateway.hold import HoldLimits
from llm_operator.gateway.limits import bounded_protocol
from llm_operator.gateway.routing import Route, RoutingTable
from llm_operator.objects import Key
from tests.gateway.support import serve, until

KEY = ("ml", "falcon")


class Recorder:
    """An ASGI upstream that records each request's raw path and query, as they arrived on the wire."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.seen.append((scope["raw_path"], scope["query_string"]))
        while (await receive()).get("more_body"):
            continue
        body = b'{"generated_text": "ok"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclass
class Rig:
    gateway: Gateway
    port: int
    upstream: Recorder
    victim: Recorder
    victim_port: int
    client: httpx.AsyncClient
    upstream_address: str

    def route(self, ready: bool = True) -> None:
        addresses = (self.upstream_address,) if ready else ()
        self.gateway.set_table(RoutingTable({KEY: Route(*KEY, addresses=addresses)}))

    async def raw(
        self, request_line: bytes, host: bytes = b"falcon.ml", body: bytes = b'{"inputs":"x"}'
    ) -> bytes:
        """Send one request as these bytes (no client normalises them); the whole answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(
            request_line + b"\r\nHost: " + host + b"\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        return answer

    def gauge(self, name: str) -> str:
        series = f'{name}{{endpoint="falcon",namespace="ml"}}'
        text = generate_latest(self.gateway.metrics.registry).decode()
        return next((row.split()[-1] for row in text.splitlines() if row.startswith(series)), "absent")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async def wake(_: Key) -> None:
        return  # the endpoint stays at zero

    settings = GatewaySettings(
        hold=HoldLimits(max_waiting=4, timeout=0.5, retry_after=7), keepalive_seconds=0.05
    )
    gateway = Gateway(settings, wake)
    upstream, victim = Recorder(), Recorder()
    protocol = bounded_protocol(settings.limits)  # as `python -m llm_operator.gateway` runs it
    async with (
        serve(upstream) as upstream_url,
        serve(victim) as victim_url,
        serve(gateway, http=protocol) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        rig = Rig(
            gateway,
            int(url.rsplit(":", 1)[1]),
            upstream,
            victim,
            int(victim_url.rsplit(":", 1)[1]),
            client,
            upstream_url.removeprefix("http://"),
        )
        rig.route()
        yield rig


def _status_and_json(answer: bytes) -> tuple[int, dict[str, str]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (
            b"*@127.0.0.1:{victim}/generate",
            b"falcon.ml",
        ),  # Host routing: the replica's address became userinfo
        (b"*@127.0.0.1:{victim}/endpoints/ml/falcon/generate", b"gateway"),
        (b"http://127.0.0.1:{victim}/generate", b"falcon.ml"),  # absolute-form
        (b"http://127.0.0.1:{victim}/endpoints/ml/falcon/generate", b"gateway"),
    ],
)
async def test_a_target_that_is_not_an_absolute_path_reaches_nothing(
    rig: Rig, target: bytes, host: bytes
) -> None:
    """Finding 1 of #10: the gateway fetched an address of the client's choosing."""
    line = b"POST " + target.replace(b"{victim}", str(rig.victim_port).encode()) + b" HTTP/1.1"
    status, body = _status_and_json(await rig.raw(line, host))
    assert (status, body["error_type"]) == (400, "validation")
    assert set(body) == {"error", "error_type"}
    assert rig.victim.seen == []
    assert rig.upstream.seen == []


async def test_the_path_is_forwarded_as_received(rig: Rig) -> None:
    """Finding 2 of #10: `%252e%252e` reached the upstream decoded twice, as `..`."""
    for line, forwarded in (
        (b"POST /endpoints/ml/falcon/x/%252e%252e/metrics HTTP/1.1", (b"/x/%252e%252e/metrics", b"")),
        (b"POST /endpoints/ml/falcon/a%2Fb/../c?q=%2F&x HTTP/1.1", (b"/a%2Fb/../c", b"q=%2F&x")),
        (b"POST /x/%252e%252e/metrics?a=%41 HTTP/1.1", (b"/x/%252e%252e/metrics", b"a=%41")),  # by Host
    ):
        status, _ = _status_and_json(await rig.raw(line))
        assert status == 200
        assert rig.upstream.seen[-1] == forwarded
    assert rig.victim.seen == []


async def test_percent_encoded_endpoint_segments_are_refused(rig: Rig) -> None:
    for line in (
        b"POST /endpoints/ml%2Ffalcon/generate HTTP/1.1",
        b"POST /endpoints/m%6C/falcon/generate HTTP/1.1",
    ):
        status, body = _status_and_json(await rig.raw(line, b"gateway"))
        assert (status, body["error_type"]) == (400, "validation")
    assert rig.upstream.seen == []


async def test_deeply_nested_json_at_zero_is_a_400_and_leaves_nothing_in_flight(rig: Rig) -> None:
    """Finding 3 of #10: RecursionError escaped, the client got 500 and in-flight stayed one higher."""
    rig.route(ready=False)
    deep = b'{"stream": true, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    for _ in range(3):
        answer = await rig.client.post(
            "/endpoints/ml/falcon/", content=deep, headers={"content-type": "application/json"}
        )
        assert (answer.status_code, answer.json()["error_type"]) == (400, "validation")
    assert rig.gauge("llm_gateway_requests_in_flight") == "0.0"
    assert rig.gauge("llm_gateway_requests_held") in ("0.0", "absent")


async def test_one_client_gets_its_share_of_the_hold_and_no_longer_than_the_hold_timeout(rig: Rig) -> None:
    """Finding 10 of #10: one client could hold every slot, each for as long as it asked (up to 3600 s)."""
    rig.route(ready=False)
    headers = {"x-scale-up-timeout": "3600"}
    first = asyncio.create_task(
        rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "a"}, headers=headers)
    )
    await until(lambda: rig.gateway.holds.waiting(KEY) >= 1, "first request held")
    second = await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "b"}, headers=headers)
    assert (second.status_code, second.json()["error_type"]) == (
        503,
        "scale_up_queue_full",
    )  # 4 // 4 = 1 each
    assert second.headers["retry-after"] == "7"
    held = await first  # capped at the hold timeout (0.5 s), not the 3600 s asked for
    assert (held.status_code, held.json()["error_type"]) == (503, "scale_up_timeout")
    assert rig.gauge("llm_gateway_requests_in_flight") == "0.0"
