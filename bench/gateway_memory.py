"""The gateway process's memory under 1,000 idle keep-alive connections and under 100 held requests.

The real gateway process (`llm_devstack.standalone_gateway`: the gateway's own flags, servers and bounds;
its routing table given on the command line), a fresh one per load, RSS read from /proc/PID/status (VmRSS)
before and after it:
1. 1,000 connections that each made one request and now idle (keep-alive and header deadlines raised so they
   stay open while measured; spread over four loopback addresses, under the per-client cap);
2. 100 requests held for an endpoint at zero whose wake never completes (1 KiB bodies, four addresses).
Printed with the ratio to the chart's gateway memory limit (values.yaml gateway.resources.limits.memory);
goal: below half of it. Results: bench/results/gateway_memory.json.
"""

from __future__ import annotations

import asyncio
import json
import resource
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import yaml

from llm_devstack.paths import ROOT
from llm_devstack.processes import StandaloneGateway
from llm_operator.gateway.limits import ServerLimits

RESULTS = ROOT / "bench" / "results" / "gateway_memory.json"
VALUES = ROOT / "charts" / "llm-endpoints" / "values.yaml"
SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
IDLE, HELD = 1000, 100
MIB = 2**20
GET = b"GET /nothing HTTP/1.1\r\nHost: gw\r\n\r\n"
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def chart_limit() -> int:
    """The chart's gateway memory limit, bytes."""
    text = yaml.safe_load(VALUES.read_text())["gateway"]["resources"]["limits"]["memory"]
    return int(text[:-2]) * UNITS[text[-2:]]


async def _exchange(source: str, port: int, request: bytes, answer: bool) -> asyncio.StreamWriter:
    """A connection from `source` that sends `request` (and reads its answer's head when `answer`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(request)
    await writer.drain()
    if answer:
        await reader.readuntil(b"\r\n\r\n")
    return writer


async def _held(admin_url: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{admin_url}/metrics")).text
    line = 'llm_gateway_requests_held{endpoint="asleep",namespace="bench"}'
    return next((float(r.split()[-1]) for r in text.splitlines() if r.startswith(line)), 0.0)


async def _warm(gateway: StandaloneGateway) -> int:
    """Imports and first allocations done (a request from each address); the baseline RSS."""
    for source in SOURCES:
        (await _exchange(source, gateway.port, GET, answer=True)).close()
    await asyncio.sleep(0.5)
    return gateway.rss()


async def idle_connections(gateway: StandaloneGateway) -> dict[str, Any]:
    before = await _warm(gateway)
    idle = [await _exchange(SOURCES[i % len(SOURCES)], gateway.port, GET, answer=True) for i in range(IDLE)]
    await asyncio.sleep(1)
    after = gateway.rss()
    for writer in idle:
        writer.close()
    return {"count": IDLE, "rss_before": before, "rss_after": after}


async def held_requests(gateway: StandaloneGateway) -> dict[str, Any]:
    body = json.dumps({"inputs": "x" * 1000, "parameters": {"max_new_tokens": 16}}).encode()
    post = (
        b"POST /endpoints/bench/asleep/generate HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    before = await _warm(gateway)
    held = [await _exchange(SOURCES[i % len(SOURCES)], gateway.port, post, answer=False) for i in range(HELD)]
    for _ in range(500):
        if await _held(gateway.admin_url) == HELD:
            break
        await asyncio.sleep(0.02)
    else:
        raise RuntimeError(f"not all {HELD} requests were held: {await _held(gateway.admin_url)}")
    await asyncio.sleep(1)
    after = gateway.rss()
    for writer in held:
        writer.close()
    return {"count": HELD, "rss_before": before, "rss_after": after}


def run(load: Callable[[StandaloneGateway], Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
    """`load` against a fresh gateway process."""
    # HELD is above the default hold per endpoint; each of the four addresses holds a quarter of it
    flags = (
        "--route=bench/asleep=",
        "--idle-seconds=600",
        "--header-seconds=600",
        "--hold-timeout=600",
        f"--max-held={HELD}",
    )
    with tempfile.TemporaryDirectory(prefix="bench-gateway-memory-") as tmp:
        gateway = StandaloneGateway(Path(tmp) / "gateway.log", *flags).start()
        try:
            return asyncio.run(load(gateway))
        finally:
            gateway.stop()


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    limit = chart_limit()
    started = time.monotonic()
    figures = {"idle_connections": run(idle_connections), "held_requests": run(held_requests)}
    bounds = ServerLimits()
    worst = bounds.max_connections * bounds.header_bytes + bounds.body_budget_bytes
    print(f"\ngateway memory (RSS, MiB; chart limit {limit / MIB:.0f} MiB, goal: below half)")
    for name, row in figures.items():
        row["ratio_to_limit"] = row["rss_after"] / limit
        before, after = row["rss_before"] / MIB, row["rss_after"] / MIB
        print(
            f"  {name:<17} {row['count']:>5}: {before:6.1f} -> {after:6.1f}"
            f"  (+{after - before:.1f}; {row['ratio_to_limit']:.2f} of the limit)"
        )
    print(
        f"  buffers the default bounds allow beyond that: {worst / MIB:.0f} MiB "
        f"({bounds.max_connections} unfinished {bounds.header_bytes // 1024} KiB heads + the "
        f"{bounds.body_budget_bytes // MIB} MiB body budget)"
    )
    result = {
        "chart_limit_bytes": limit,
        "goal": "rss_after below half the chart limit",
        "met": all(row["rss_after"] < limit / 2 for row in figures.values()),
        "bound_buffers_bytes": worst,
        "seconds": time.monotonic() - started,
        **figures,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
