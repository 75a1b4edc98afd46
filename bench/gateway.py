"""Benchmark: latency the gateway adds, and its throughput, against calling the upstream directly.

    .venv/bin/python bench/gateway.py [--requests 1000] [--concurrency 32]

The upstream is the stand-in replica of tests/gateway/support.py (a small starlette app, not the serving
server), so the figures are the proxy's own cost. Upstream and gateway each run in their own process under
uvicorn on 127.0.0.1; the client (httpx) in this one. One run; prints ratios; writes
bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BODY = {"inputs": "hello", "parameters": {"max_new_tokens": 4}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(role: str, port: int, upstream: str) -> None:
    """Child process: run the upstream or the gateway (routing table fed with the upstream)."""
    import uvicorn

    from llm_operator.gateway.app import Gateway, GatewaySettings
    from llm_operator.gateway.routing import Route, RoutingTable
    from tests.gateway.support import StandInUpstream

    async def never(_: Any) -> None:
        raise RuntimeError("the bench endpoint is always ready")

    if role == "upstream":
        app: Any = StandInUpstream(tokens=8).app
    else:
        app = Gateway(GatewaySettings(), never)
        app.set_table(RoutingTable({("bench", "ep"): Route("bench", "ep", addresses=(upstream,))}))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def _wait_up(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                await client.get(url)
                return
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    raise TimeoutError(url)


async def measure(base: str, requests: int, concurrency: int) -> dict[str, float]:
    """Sequential latency (p50/p99 of /generate) and concurrent throughput (requests/s)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        for _ in range(50):  # warm-up
            (await client.post("/generate", json=BODY)).raise_for_status()
        latencies = []
        for _ in range(requests):
            started = time.perf_counter()
            (await client.post("/generate", json=BODY)).raise_for_status()
            latencies.append(time.perf_counter() - started)
        queue = iter(range(requests * 2))

        async def worker() -> None:
            for _ in queue:
                (await client.post("/generate_stream", json=BODY)).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return {"p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "streams_per_s": requests * 2 / elapsed}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    up_port, gw_port = _free_port(), _free_port()
    upstream = f"127.0.0.1:{up_port}"
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 (started once, before any measuring)
            [sys.executable, __file__, "--serve", role, "--port", str(port), "--upstream", upstream]
        )
        for role, port in (("upstream", up_port), ("gateway", gw_port))
    ]
    try:
        await _wait_up(f"http://{upstream}/health")
        await _wait_up(f"http://127.0.0.1:{gw_port}/healthz")
        direct = await measure(f"http://{upstream}", args.requests, args.concurrency)
        through = f"http://127.0.0.1:{gw_port}/endpoints/bench/ep"
        gateway = await measure(through, args.requests, args.concurrency)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    return {
        "direct": direct,
        "gateway": gateway,
        "added_p50_ms": gateway["p50_ms"] - direct["p50_ms"],
        "added_p99_ms": gateway["p99_ms"] - direct["p99_ms"],
        "throughput_ratio": gateway["streams_per_s"] / direct["streams_per_s"],
        "requests": args.requests,
        "concurrency": args.concurrency,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "note": "stand-in upstream (starlette), uvicorn without httptools/uvloop, 2 shared CPU cores",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--serve", choices=["upstream", "gateway"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve:
        serve(parsed.serve, parsed.port, parsed.upstream)
        sys.exit(0)
    result = asyncio.run(main(parsed))
    print(json.dumps(result, indent=2))
    print(
        f"added latency p50 {result['added_p50_ms']:.2f} ms, p99 {result['added_p99_ms']:.2f} ms; "
        f"throughput {result['throughput_ratio']:.0%} of direct"
    )
    (ROOT / "bench" / "results" / "gateway.json").write_text(json.dumps(result, indent=2) + "\n")
