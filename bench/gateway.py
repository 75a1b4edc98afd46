"""Benchmark: what the gateway costs, against calling the upstream directly and against nginx as a plain
proxy.

    .venv/bin/python -m bench.gateway [--requests 1000] [--concurrency 32] [--rounds 5]

Three ways to one upstream, under the same load in one run:
- direct: the client calls the upstream;
- gateway: through our gateway, run as `python -m llm_operator.gateway` runs it (uvicorn + httptools on
  uvloop, `__main__.server_config`), its routing table fed with the upstream;
- nginx: through /usr/sbin/nginx as a plain reverse proxy (one worker, HTTP/1.1 upstream keep-alive,
  `proxy_buffering off`), from a config generated in a temporary folder.

The upstream is the dev stack's stand-in replica (`llm_devstack.upstream`: a starlette app under uvicorn,
not the serving server, so the figures are the proxies' own cost): `/generate` answers one JSON body, and
`/generate_stream` eight SSE events. Each server runs in its own process on 127.0.0.1, the client (aiohttp)
in this one. To share the machine's noise fairly, the three ways are interleaved: latency request by request
(sequential: p50/p99 of `/generate`, and of a whole `/generate_stream`), throughput round by round (streams
per second at `--concurrency`, the median of `--rounds`). Prints added latency and throughput ratios; writes
bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from llm_devstack.paths import ROOT
from llm_devstack.ports import free_port

BODY = {"inputs": "hello", "parameters": {"max_new_tokens": 4}}
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream replica {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replica;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def serve(role: str, port: int, upstream: str) -> None:
    """Child process: run the upstream, or the gateway (routing table fed with the upstream)."""
    import uvicorn

    from llm_devstack.upstream import StandInUpstream
    from llm_operator.gateway.__main__ import run_loop, server_config
    from llm_operator.gateway.app import Gateway, GatewaySettings
    from llm_operator.gateway.routing import Route, RoutingTable

    async def never(_: Any) -> None:
        raise RuntimeError("the bench endpoint is always ready")

    if role == "upstream":
        uvicorn.run(StandInUpstream(tokens=8).app, host="127.0.0.1", port=port, log_level="warning")
        return
    gateway = Gateway(GatewaySettings(), never)
    gateway.set_table(RoutingTable({("bench", "ep"): Route("bench", "ep", addresses=(upstream,))}))
    run_loop(uvicorn.Server(server_config(gateway, "127.0.0.1", port, gateway.settings.limits)).serve())


@contextmanager
def nginx(upstream: str, port: int) -> Iterator[subprocess.Popen[bytes] | None]:
    """nginx proxying to `upstream` on `port`, or None where nginx is not installed."""
    if not Path(NGINX).exists():
        print(f"{NGINX} missing (make system-packages installs it): no nginx figures", file=sys.stderr)
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        os.chmod(tmp, 0o755)  # nginx's worker may run as another user
        conf = Path(tmp, "nginx.conf")
        conf.write_text(NGINX_CONF.format(tmp=tmp, upstream=upstream, port=port))
        proc = subprocess.Popen([NGINX, "-p", tmp, "-c", str(conf), "-e", f"{tmp}/error.log"])
        try:
            yield proc
        finally:
            proc.terminate()
            proc.wait(10)
            errors = Path(tmp, "error.log")
            if errors.exists() and "[error]" in (text := errors.read_text()):
                print(f"nginx error log:\n{text[-2000:]}", file=sys.stderr)


async def _wait_up(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(400):
        try:
            async with session.get(url) as answer:
                await answer.read()
                if answer.status < 500:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(url)


async def _call(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(url, json=BODY) as answer:
        await answer.read()
        if answer.status != 200:
            raise RuntimeError(f"{url}: HTTP {answer.status}")


def _quantiles(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100)
    return {"p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


async def measure(
    bases: dict[str, str], servers: dict[str, list[psutil.Process]], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Interleaved sequential latency, then interleaved concurrent throughput rounds.

    The CPU time each server process spends per stream in the throughput rounds is less subject to the
    machine's noise than the rates: `servers` names the processes ("upstream", and each proxy by its way).
    """
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        for base in bases.values():
            for _ in range(50):  # warm-up: connections open, code paths hot
                await _call(session, f"{base}/generate")
                await _call(session, f"{base}/generate_stream")
        latency: dict[str, dict[str, list[float]]] = {name: {"generate": [], "stream": []} for name in bases}
        for _ in range(args.requests):
            for path, kind in (("/generate", "generate"), ("/generate_stream", "stream")):
                for name, base in bases.items():
                    started = time.perf_counter()
                    await _call(session, base + path)
                    latency[name][kind].append(time.perf_counter() - started)
        rates: dict[str, list[float]] = {name: [] for name in bases}
        cpu: dict[str, dict[str, float]] = {name: {"upstream": 0.0, "proxy": 0.0} for name in bases}
        for _ in range(args.rounds):
            for name, base in bases.items():
                queue = iter(range(args.requests))
                url = f"{base}/generate_stream"

                async def worker(url: str = url, queue: Iterator[int] = queue) -> None:
                    for _ in queue:
                        await _call(session, url)

                proxy = servers.get(name, [])
                cpu_before = _cpu_seconds(servers["upstream"]), _cpu_seconds(proxy)
                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(args.concurrency)))
                rates[name].append(args.requests / (time.perf_counter() - started))
                cpu[name]["upstream"] += _cpu_seconds(servers["upstream"]) - cpu_before[0]
                cpu[name]["proxy"] += _cpu_seconds(proxy) - cpu_before[1]
    return {
        name: {
            "generate": _quantiles(latency[name]["generate"]),
            "stream": _quantiles(latency[name]["stream"]),
            "streams_per_s": statistics.median(rates[name]),
            "streams_per_s_rounds": rates[name],
            "upstream_cpu_us_per_stream": cpu[name]["upstream"] / (args.rounds * args.requests) * 1e6,
            "proxy_cpu_us_per_stream": cpu[name]["proxy"] / (args.rounds * args.requests) * 1e6,
        }
        for name in bases
    }


def _versus(proxy: dict[str, Any], direct: dict[str, Any]) -> dict[str, float]:
    return {
        "added_p50_ms": proxy["generate"]["p50_ms"] - direct["generate"]["p50_ms"],
        "added_p99_ms": proxy["generate"]["p99_ms"] - direct["generate"]["p99_ms"],
        "stream_added_p50_ms": proxy["stream"]["p50_ms"] - direct["stream"]["p50_ms"],
        "stream_added_p99_ms": proxy["stream"]["p99_ms"] - direct["stream"]["p99_ms"],
        "throughput_ratio": proxy["streams_per_s"] / direct["streams_per_s"],
        "proxy_cpu_vs_upstream_cpu": proxy["proxy_cpu_us_per_stream"] / direct["upstream_cpu_us_per_stream"],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    up_port, gw_port, ngx_port = free_port(), free_port(), free_port()
    upstream = f"127.0.0.1:{up_port}"
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 (started once, before any measuring)
            [sys.executable, __file__, "--serve", role, "--port", str(port), "--upstream", upstream]
        )
        for role, port in (("upstream", up_port), ("gateway", gw_port))
    ]
    bases = {"direct": f"http://{upstream}", "gateway": f"http://127.0.0.1:{gw_port}/endpoints/bench/ep"}
    try:
        with nginx(upstream, ngx_port) as proxy:
            if proxy is not None:
                bases["nginx"] = f"http://127.0.0.1:{ngx_port}"
            async with aiohttp.ClientSession() as session:
                await _wait_up(session, f"http://{upstream}/health")
                await _wait_up(session, f"{bases['gateway']}/health")  # through it to the upstream
                if proxy is not None:
                    await _wait_up(session, f"{bases['nginx']}/health")
            servers = {"upstream": [psutil.Process(procs[0].pid)], "gateway": [psutil.Process(procs[1].pid)]}
            if proxy is not None:
                master = psutil.Process(proxy.pid)
                servers["nginx"] = [master, *master.children()]
            figures = await measure(bases, servers, args)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    result: dict[str, Any] = {**figures, "gateway_vs_direct": _versus(figures["gateway"], figures["direct"])}
    if "nginx" in figures:
        result["nginx_vs_direct"] = _versus(figures["nginx"], figures["direct"])
        result["gateway_vs_nginx"] = {
            "added_p50_ratio": result["gateway_vs_direct"]["added_p50_ms"]
            / max(result["nginx_vs_direct"]["added_p50_ms"], 1e-3),
            "throughput_ratio": figures["gateway"]["streams_per_s"] / figures["nginx"]["streams_per_s"],
            "cpu_ratio": figures["gateway"]["proxy_cpu_us_per_stream"]
            / figures["nginx"]["proxy_cpu_us_per_stream"],
        }
    result.update(
        requests=args.requests,
        concurrency=args.concurrency,
        rounds=args.rounds,
        cpus=os.cpu_count(),
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        note="stand-in upstream (starlette under uvicorn), one process each, aiohttp client; shared CPUs",
    )
    return result


def _report(result: dict[str, Any]) -> str:
    lines = []
    for name in ("gateway", "nginx"):
        if (v := result.get(f"{name}_vs_direct")) is None:
            continue
        lines.append(
            f"{name:8} vs direct: added latency p50 {v['added_p50_ms']:+.2f} ms,"
            f" p99 {v['added_p99_ms']:+.2f} ms"
            f" (whole stream p50 {v['stream_added_p50_ms']:+.2f} ms, p99 {v['stream_added_p99_ms']:+.2f} ms);"
            f" streaming throughput {v['throughput_ratio']:.0%} of direct;"
            f" CPU per stream {result[name]['proxy_cpu_us_per_stream']:.0f} us"
            f" ({v['proxy_cpu_vs_upstream_cpu']:.0%} of the upstream's)"
        )
    if (g := result.get("gateway_vs_nginx")) is not None:
        lines.append(
            f"gateway vs nginx: {g['added_p50_ratio']:.1f}x nginx's added p50, "
            f"{g['throughput_ratio']:.0%} of nginx's throughput, {g['cpu_ratio']:.1f}x nginx's CPU per stream"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per way and kind")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds (of --requests streams)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    parser.add_argument("--serve", choices=["upstream", "gateway"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve:
        serve(parsed.serve, parsed.port, parsed.upstream)
        sys.exit(0)
    outcome = asyncio.run(main(parsed))
    print(json.dumps(outcome, indent=2))
    print(_report(outcome))
    parsed.output.write_text(json.dumps(outcome, indent=2) + "\n")
