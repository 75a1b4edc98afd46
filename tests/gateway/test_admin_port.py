"""The gateway process's two ports and its drain: metrics and health only on the admin port; on SIGTERM the
traffic port stops taking connections while a stream in flight and a held request still finish. And the
chart as helm renders it: probes, Services and the ServiceMonitor on the admin port, the bounds as flags."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llm_devstack.controlplane import default_bin_dir
from llm_devstack.paths import ROOT
from llm_devstack.processes import StandaloneGateway
from llm_devstack.upstream import StandInUpstream
from llm_operator.contract import ADMIN_PORT
from llm_operator.gateway.__main__ import parse_args, settings_from
from llm_operator.gateway.limits import ServerLimits
from tests.gateway.support import serve


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[StandInUpstream, str]]:
    replica = StandInUpstream(tokens=3)
    replica.gate = asyncio.Event()
    async with serve(replica.app) as url:
        yield replica, url.removeprefix("http://")


async def test_metrics_and_health_are_on_the_admin_port_only(tmp_path: Path) -> None:
    with StandaloneGateway(tmp_path / "gateway.log", "--route=ml/falcon=") as gateway:
        async with httpx.AsyncClient(timeout=10) as client:
            for path in ("/metrics", "/healthz", "/readyz"):
                traffic = await client.get(gateway.url + path)
                assert traffic.status_code == 404, path
                assert traffic.json()["error_type"] == "not_found"
            metrics = await client.get(gateway.admin_url + "/metrics")
            assert metrics.status_code == 200
            assert metrics.headers["content-type"].startswith("text/plain")
            assert (await client.get(gateway.admin_url + "/healthz")).status_code == 200
            assert (await client.get(gateway.admin_url + "/readyz")).status_code == 200
            assert (await client.get(gateway.admin_url + "/endpoints/ml/falcon/x")).status_code == 404
    assert gateway.popen is not None
    assert gateway.popen.returncode == 0, gateway.tail()


async def _drain_started(client: httpx.AsyncClient, gateway: StandaloneGateway) -> None:
    """The admin port says not ready, and the traffic port takes no new connection."""
    for _ in range(100):
        if (await client.get(gateway.admin_url + "/readyz")).status_code == 503:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("/readyz still 200 after SIGTERM")
    for _ in range(100):
        try:
            async with httpx.AsyncClient() as fresh:
                await fresh.get(gateway.url + "/x")
        except httpx.ConnectError:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the traffic port still takes connections after SIGTERM")


async def _until_held(client: httpx.AsyncClient, gateway: StandaloneGateway, count: int) -> None:
    """The admin port's metrics show `count` requests held for ml/asleep."""
    line = f'llm_gateway_requests_held{{endpoint="asleep",namespace="ml"}} {count:.1f}'
    for _ in range(100):
        if line in (await client.get(gateway.admin_url + "/metrics")).text:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not {count} requests held")


async def test_sigterm_lets_the_stream_in_flight_finish(
    tmp_path: Path, upstream: tuple[StandInUpstream, str]
) -> None:
    replica, address = upstream
    assert replica.gate is not None
    flags = (f"--route=ml/falcon={address}", "--shutdown-grace-seconds=10")
    with StandaloneGateway(tmp_path / "gateway.log", *flags) as gateway:
        async with httpx.AsyncClient(timeout=10) as client:
            url = f"{gateway.url}/endpoints/ml/falcon/generate_stream"
            async with client.stream("POST", url, json={"inputs": "hi"}) as answer:
                chunks = answer.aiter_raw()
                assert (await anext(chunks)).startswith(b"data: ")  # the first token, then the upstream waits
                gateway.signal(signal.SIGTERM)
                await _drain_started(client, gateway)
                await asyncio.sleep(1.0)  # the stream is still being drained, not cut
                replica.gate.set()
                rest = b"".join([chunk async for chunk in chunks])
            last = json.loads(rest.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
            assert last["generated_text"] == " t1 t2 t3"
        assert gateway.popen is not None
        assert gateway.popen.wait(10) == 0, gateway.tail()


async def test_sigterm_keeps_holding_a_request_until_its_replica_is_ready(
    tmp_path: Path, upstream: tuple[StandInUpstream, str]
) -> None:
    replica, address = upstream
    flags = ("--route=ml/asleep=", f"--wake-to={address}", "--wake-after=2", "--shutdown-grace-seconds=10")
    with StandaloneGateway(tmp_path / "gateway.log", *flags) as gateway:
        async with httpx.AsyncClient(timeout=10) as client:
            held = asyncio.create_task(
                client.post(f"{gateway.url}/endpoints/ml/asleep/generate", json={"inputs": "hi"})
            )
            await _until_held(client, gateway, 1)
            gateway.signal(signal.SIGTERM)
            await _drain_started(client, gateway)
            answer = await held
            assert answer.status_code == 200
            assert answer.json()["generated_text"] == "hello world"
        assert gateway.popen is not None
        assert gateway.popen.wait(10) == 0, gateway.tail()
    assert [seen["path"] for seen in replica.received] == ["/generate"]


async def test_requests_still_held_when_the_grace_ends_are_told_to_retry(tmp_path: Path) -> None:
    flags = ("--route=ml/asleep=", "--hold-timeout=60", "--shutdown-grace-seconds=2")
    with StandaloneGateway(tmp_path / "gateway.log", *flags) as gateway:
        async with httpx.AsyncClient(timeout=10) as client:
            url = f"{gateway.url}/endpoints/ml/asleep"
            plain = asyncio.create_task(client.post(f"{url}/generate", json={"inputs": "hi"}))
            async with client.stream("POST", f"{url}/generate_stream", json={"inputs": "hi"}) as stream:
                events = stream.aiter_raw()
                assert (await anext(events)).startswith(b": waiting")  # held, as SSE
                await _until_held(client, gateway, 2)
                gateway.signal(signal.SIGTERM)
                rest = b"".join([chunk async for chunk in events])
            answer = await plain
        assert gateway.popen is not None
        assert gateway.popen.wait(10) == 0, gateway.tail()
    assert (answer.status_code, answer.headers["retry-after"]) == (503, "1")
    assert answer.json()["error_type"] == "gateway_draining"
    last = json.loads(rest.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
    assert last["error_type"] == "gateway_draining"


def _chart(*values: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The chart rendered by the real helm, by (kind, name)."""
    sets = [arg for value in ("gateway.internalCIDRs={10.0.0.0/8}", *values) for arg in ("--set", value)]
    argv = [str(default_bin_dir() / "helm"), "template", "rel", str(ROOT / "charts" / "llm-endpoints"), *sets]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    docs = [doc for doc in yaml.safe_load_all(out) if doc]
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_the_chart_defaults_are_the_gateway_defaults() -> None:
    args = parse_args(_container(_chart()[("Deployment", "rel-llm-endpoints-gateway")])["args"])
    assert args.admin_port == ADMIN_PORT
    assert settings_from(args).limits == ServerLimits()


def test_the_chart_probes_and_scrapes_the_admin_port_and_passes_the_bounds() -> None:
    docs = _chart(
        "gateway.adminPort=9191",
        "gateway.limits.bodyBudgetBytes=134217728",
        "gateway.limits.headerSeconds=20",
        "metrics.serviceMonitor.enabled=true",
    )
    container = _container(docs[("Deployment", "rel-llm-endpoints-gateway")])
    args = parse_args(container["args"])
    assert args.admin_port == 9191
    assert settings_from(args).limits == replace(
        ServerLimits(), body_budget_bytes=134217728, header_seconds=20
    )
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080, "admin": 9191}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    traffic = docs[("Service", "rel-llm-endpoints-gateway")]["spec"]
    assert [p["name"] for p in traffic["ports"]] == ["http"]  # may be a LoadBalancer: no admin port on it
    admin = docs[("Service", "rel-llm-endpoints-gateway-admin")]["spec"]
    assert admin["type"] == "ClusterIP"
    assert admin["ports"] == [{"name": "admin", "port": 9191, "targetPort": "admin"}]
    scraped = [e["port"] for e in docs[("ServiceMonitor", "rel-llm-endpoints")]["spec"]["endpoints"]]
    assert "admin" in scraped
    assert "http" not in scraped
    operator = _container(docs[("Deployment", "rel-llm-endpoints-operator")])
    assert "--gateway-metrics-port=9191" in operator["args"]
