"""The real gateway (uvicorn on loopback) before a stand-in upstream; the routing table is fed directly."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest

from llm_devstack.upstream import StandInUpstream
from llm_operator.apikey import key_hash
from llm_operator.gateway.admin import AdminApp
from llm_operator.gateway.app import Gateway, GatewaySettings
from llm_operator.gateway.auth import AccessPolicy
from llm_operator.gateway.coldstart import PHASES
from llm_operator.gateway.hold import HoldLimits
from llm_operator.gateway.routing import Route, RoutingTable
from llm_operator.objects import Key
from tests.gateway.support import serve, until

KEY = ("ml", "falcon")
POD = "falcon-7d9f-x2"
TIMEOUT = httpx.Timeout(10.0)


class Waker:
    """Plays the scale-up: records calls; when `address` is set, the endpoint becomes ready on wake."""

    def __init__(self) -> None:
        self.calls: list[Key] = []
        self.gateway: Gateway | None = None
        self.address: str | None = None
        self.release = asyncio.Event()

    async def __call__(self, key: Key) -> None:
        self.calls.append(key)
        if self.address is None or self.gateway is None:
            return
        await self.release.wait()
        route = self.gateway.table.get(key)
        assert route is not None
        woken = replace(route, addresses=(self.address,), pods={self.address: POD})
        self.gateway.set_table(self.gateway.table.with_route(woken))


async def recorded_pod(namespace: str, name: str) -> dict[str, Any]:
    """Stands in for the API server's answer about the woken pod: every step stamped one second ago."""
    stamp = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "metadata": {"namespace": namespace, "name": name},
        "status": {
            "conditions": [
                {"type": kind, "status": "True", "lastTransitionTime": stamp}
                for kind in ("PodScheduled", "Ready")
            ],
            "containerStatuses": [{"name": "server", "state": {"running": {"startedAt": stamp}}}],
        },
    }


@dataclass
class Rig:
    gateway: Gateway
    url: str
    upstream: StandInUpstream
    upstream_address: str
    waker: Waker
    client: httpx.AsyncClient

    def route(self, ready: bool = True, **fields: object) -> None:
        addresses = (self.upstream_address,) if ready else ()
        route = replace(Route(*KEY, addresses=addresses), **fields)  # type: ignore[arg-type]
        self.gateway.set_table(RoutingTable({KEY: route}))


def _settings() -> GatewaySettings:
    return GatewaySettings(
        hold=HoldLimits(max_waiting=2, max_waiting_per_client=2, timeout=5.0, retry_after=7),
        access=AccessPolicy.from_cidrs(("10.0.0.0/8",)),  # loopback counts as outside here
        keepalive_seconds=0.05,
    )


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    waker = Waker()
    gateway = Gateway(_settings(), waker, pods=recorded_pod)
    waker.gateway = gateway
    upstream = StandInUpstream()
    async with (
        serve(upstream.app) as upstream_url,
        serve(gateway) as url,
        httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client,
    ):
        rig = Rig(gateway, url, upstream, upstream_url.removeprefix("http://"), waker, client)
        rig.route()
        yield rig


async def test_path_routing_passes_request_and_answer_through(rig: Rig) -> None:
    answer = await rig.client.post(
        "/endpoints/ml/falcon/generate?x=1", json={"inputs": "hi"}, headers={"x-custom": "kept"}
    )
    assert answer.status_code == 200
    assert answer.headers["x-upstream"] == "1"
    seen = answer.json()["seen"]
    assert (seen["path"], seen["query"], json.loads(seen["body"])) == ("/generate", "x=1", {"inputs": "hi"})
    assert seen["headers"]["x-custom"] == "kept"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"


async def test_host_routing(rig: Rig) -> None:
    answer = await rig.client.post("/generate", json={"inputs": "hi"}, headers={"host": "falcon.ml.svc"})
    assert answer.status_code == 200
    assert answer.json()["seen"]["path"] == "/generate"


async def test_unknown_endpoint_is_a_tgi_shaped_404(rig: Rig) -> None:
    answer = await rig.client.post("/endpoints/ml/nope/generate", json={"inputs": "hi"})
    assert answer.status_code == 404
    assert answer.json()["error_type"] == "not_found"
    assert set(answer.json()) == {"error", "error_type"}


async def test_stream_is_relayed_event_by_event(rig: Rig) -> None:
    rig.upstream.gate = asyncio.Event()
    async with rig.client.stream(
        "POST", "/endpoints/ml/falcon/generate_stream", json={"inputs": "hi"}
    ) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        chunks = answer.aiter_raw()
        first = await asyncio.wait_for(anext(chunks), 5)  # arrives while the upstream is paused
        assert first.startswith(b'data: {"index": 1')
        rig.upstream.gate.set()
        rest = b"".join([chunk async for chunk in chunks])
    events = [json.loads(line[6:]) for line in (first + rest).split(b"\n\n") if line]
    assert [e["index"] for e in events] == [1, 2, 3]
    assert events[-1]["generated_text"] == " t1 t2 t3"


async def test_client_going_away_closes_the_upstream_stream(rig: Rig) -> None:
    rig.upstream.gate = asyncio.Event()
    async with rig.client.stream(
        "POST", "/endpoints/ml/falcon/generate_stream", json={"inputs": "hi"}
    ) as answer:
        await anext(answer.aiter_raw())
    await asyncio.wait_for(rig.upstream.stream_closed.wait(), 5)
    rig.upstream.gate.set()


async def test_protected_endpoint_needs_its_token(rig: Rig) -> None:
    rig.route(access="protected", api_key_hash=key_hash("3f0c-uid", "s3cret"))  # as the operator publishes
    missing = await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "hi"})
    wrong = await rig.client.post(
        "/endpoints/ml/falcon/generate", json={"inputs": "hi"}, headers={"authorization": "Bearer nope"}
    )
    right = await rig.client.post(
        "/endpoints/ml/falcon/generate", json={"inputs": "hi"}, headers={"authorization": "Bearer s3cret"}
    )
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert missing.json()["error_type"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    # Forwarded, so that the serving pod checks the key too (every hop is protected).
    assert right.json()["seen"]["headers"]["authorization"] == "Bearer s3cret"


async def test_private_endpoint_refuses_outside_callers(rig: Rig) -> None:
    rig.route(access="private")
    answer = await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "hi"})
    assert answer.status_code == 403
    assert answer.json()["error_type"] == "forbidden"


async def test_a_paused_endpoint_refuses_without_waking(rig: Rig) -> None:
    for ready in (False, True):
        rig.route(ready=ready, paused=True)
        answer = await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "hi"})
        assert answer.status_code == 503
        assert answer.json()["error_type"] == "paused"
        assert "retry-after" not in answer.headers  # it does not come back by itself
    assert rig.waker.calls == []
    assert rig.upstream.received == []


async def test_held_requests_share_one_wake_and_are_answered(rig: Rig) -> None:
    rig.route(ready=False)
    rig.waker.address = rig.upstream_address
    requests = [
        asyncio.create_task(rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": str(i)}))
        for i in range(2)
    ]
    await until(lambda: rig.gateway.holds.waiting(KEY) >= 2, "requests held")
    metrics = generate_latest(rig.gateway.metrics.registry).decode()
    assert 'llm_gateway_requests_held{endpoint="falcon",namespace="ml"} 2.0' in metrics
    assert 'llm_gateway_requests_in_flight{endpoint="falcon",namespace="ml"} 2.0' in metrics
    rig.waker.release.set()
    answers = await asyncio.gather(*requests)
    assert [a.status_code for a in answers] == [200, 200]
    assert rig.waker.calls == [KEY]
    registry = rig.gateway.metrics.registry
    await until(lambda: b'phase="first_byte"' in generate_latest(registry), "cold-start breakdown recorded")
    metrics = generate_latest(rig.gateway.metrics.registry).decode()
    for phase in PHASES:  # one wake, so one observation of each phase, the pod's own included
        count = (
            f'llm_gateway_cold_start_seconds_count{{endpoint="falcon",namespace="ml",phase="{phase}"}} 1.0'
        )
        assert count in metrics
    assert 'llm_gateway_requests_total{code="200",endpoint="falcon",namespace="ml"} 2.0' in metrics
    assert "llm_gateway_last_request_timestamp_seconds" in metrics


async def test_held_stream_gets_keepalives_then_the_tokens(rig: Rig) -> None:
    rig.route(ready=False)
    rig.waker.address = rig.upstream_address
    async with rig.client.stream(
        "POST", "/endpoints/ml/falcon/generate_stream", json={"inputs": "hi"}
    ) as answer:
        assert answer.status_code == 200
        chunks = answer.aiter_raw()
        received = b""
        while received.count(b": waiting for a replica\n\n") < 2:
            received += await asyncio.wait_for(anext(chunks), 5)
        rig.waker.release.set()
        received += b"".join([chunk async for chunk in chunks])
    assert received.startswith(b": waiting for a replica\n\n")
    data = [line for line in received.split(b"\n\n") if line.startswith(b"data: ")]
    assert [json.loads(d[6:])["index"] for d in data] == [1, 2, 3]


async def test_count_bound_gives_503_with_retry_after(rig: Rig) -> None:
    rig.gateway.holds.limits = replace(rig.gateway.holds.limits, max_waiting=1)
    rig.route(ready=False)
    first = asyncio.create_task(rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "a"}))
    await until(lambda: rig.gateway.holds.waiting(KEY) >= 1, "requests held")
    refused = await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "b"})
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "7"
    assert refused.json()["error_type"] == "scale_up_queue_full"
    first.cancel()


async def test_time_bound_follows_x_scale_up_timeout(rig: Rig) -> None:
    rig.route(ready=False)
    answer = await rig.client.post(
        "/endpoints/ml/falcon/generate", json={"inputs": "a"}, headers={"x-scale-up-timeout": "0.1"}
    )
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "7"
    assert answer.json()["error_type"] == "scale_up_timeout"
    assert rig.waker.calls == [KEY]
    bad = await rig.client.post(
        "/endpoints/ml/falcon/generate", json={"inputs": "a"}, headers={"x-scale-up-timeout": "later"}
    )
    assert (bad.status_code, bad.json()["error_type"]) == (400, "validation")


async def test_held_stream_timeout_ends_with_an_sse_error_event(rig: Rig) -> None:
    rig.route(ready=False)
    answer = await rig.client.post(
        "/endpoints/ml/falcon/generate_stream", json={"inputs": "a"}, headers={"x-scale-up-timeout": "0.1"}
    )
    assert answer.status_code == 200
    last = answer.content.strip().split(b"\n\n")[-1]
    assert json.loads(last.removeprefix(b"data: "))["error_type"] == "scale_up_timeout"
    metrics = generate_latest(rig.gateway.metrics.registry).decode()
    assert 'llm_gateway_requests_total{code="503",endpoint="falcon",namespace="ml"} 1.0' in metrics


async def test_deleted_while_held_is_a_404(rig: Rig) -> None:
    rig.route(ready=False)
    request = asyncio.create_task(rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "a"}))
    await until(lambda: rig.gateway.holds.waiting(KEY) >= 1, "requests held")
    rig.gateway.set_table(RoutingTable())
    answer = await request
    assert answer.status_code == 404


async def test_dead_replica_is_skipped(rig: Rig) -> None:
    rig.route(addresses=("127.0.0.1:1", rig.upstream_address))
    for _ in range(4):
        answer = await rig.client.post("/endpoints/ml/falcon/generate", json={"inputs": "hi"})
        assert answer.status_code == 200


async def test_gateway_own_routes_are_on_the_admin_app(rig: Rig) -> None:
    for path in ("/metrics", "/healthz", "/readyz"):
        assert (await rig.client.get(path)).status_code == 404
    admin_app = AdminApp(rig.gateway.metrics.registry, lambda: rig.gateway.ready)
    async with serve(admin_app) as url, httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as admin:
        assert (await admin.get("/healthz")).status_code == 200
        assert (await admin.get("/readyz")).status_code == 503
        rig.gateway.ready = True
        assert (await admin.get("/readyz")).status_code == 200
        assert "llm_gateway_requests_in_flight" in (await admin.get("/metrics")).text
