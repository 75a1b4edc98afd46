"""Benchmark: N LLMEndpoints applied at once against the real local control plane converge.

    .venv/bin/python -m bench.operator_convergence [--count 1000] [--no-controllers]

Converged means every endpoint has its Deployment, Service and PodDisruptionBudget and a status for its
current generation. Prints the time, the operator's peak RSS and the per-endpoint cost; writes
bench/results/operator.json (or operator-no-controllers.json with --no-controllers: no controller-manager,
scheduler or kwok, so no pods: the operator's cost alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from llm_devstack.controlplane import Cluster
from llm_devstack.paths import ROOT
from llm_devstack.ports import free_port
from llm_devstack.processes import OperatorProcess
from llm_devstack.resources import endpoint, install_crd, new_namespace
from llm_operator.api.v1alpha1 import API_VERSION, KIND
from llm_operator.kube import Credentials, Kube

RESULTS = ROOT / "bench" / "results" / "operator.json"
GOALS = {"seconds": 60.0, "rss_mb": 300.0}


class PeakRSS:
    """Samples a process tree's resident memory every 100 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def apply_all(cluster: Cluster, bodies: list[dict[str, Any]], parallel: int = 32) -> None:
    """Server-side apply of every manifest, `parallel` at a time (as Argo CD or a script would)."""
    gate = asyncio.Semaphore(parallel)
    async with Kube(Credentials.load(str(cluster.kubeconfig))) as kube:

        async def one(body: dict[str, Any]) -> None:
            async with gate:
                await kube.apply(body, "bench")

        await asyncio.gather(*(one(body) for body in bodies))


def component_cpu(cluster: Cluster) -> dict[str, float]:
    """CPU seconds used so far by each control-plane component."""
    used = {}
    for process in cluster.processes:
        try:
            times = psutil.Process(process.popen.pid).cpu_times()
        except psutil.Error:
            continue
        used[process.name] = times.user + times.system + times.children_user + times.children_system
    return used


def api_requests(port: int) -> dict[str, int]:
    """The operator's API requests by method and status code, from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("llm_operator_api_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            key = labels[labels.index("{") + 1 : -1].replace('"', "")
            counts[key] = int(float(value))
    return counts


async def converged(kube: Kube, namespace: str, count: int) -> tuple[int, int]:
    """(endpoints with a current status, endpoints with all three children); children are only
    counted once every status is set (the operator applies children before it writes status)."""
    endpoints = await kube.list(API_VERSION, KIND, namespace)
    with_status = sum(
        1 for e in endpoints if e.get("status", {}).get("observedGeneration") == e["metadata"]["generation"]
    )
    if with_status < count:
        return with_status, 0
    names = [
        {item["metadata"]["name"] for item in await kube.list(api, kind, namespace)}
        for api, kind in (("apps/v1", "Deployment"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget"))
    ]
    return with_status, min(len(set.intersection(*names)), count)


async def wait_converged(cluster: Cluster, namespace: str, count: int, started: float) -> tuple[int, int]:
    """Poll every 0.5 s (one list, cheap next to the work measured) until converged or 10 minutes."""
    done = (0, 0)
    async with Kube(Credentials.load(str(cluster.kubeconfig))) as kube:
        while time.monotonic() - started < 600:
            done = await converged(kube, namespace, count)
            if done == (count, count):
                break
            await asyncio.sleep(0.5)
    return done


def run(count: int, controllers: bool, workers: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp,
        Cluster(Path(tmp) / "cluster") as cluster,
    ):
        cluster.start(controllers=controllers)
        install_crd(cluster)
        namespace = new_namespace(cluster, "bench")
        metrics_port = free_port()
        operator = OperatorProcess(
            cluster,
            namespace,
            Path(tmp),
            "bench",
            "--metrics-port",
            str(metrics_port),
            "--workers",
            str(workers),
        ).start()
        try:
            time.sleep(3)  # let it log in and start its watches before the burst
            idle_rss = psutil.Process(operator.popen.pid).memory_info().rss if operator.popen else 0
            cpu_before = component_cpu(cluster)
            with PeakRSS(operator.popen.pid if operator.popen else 0) as rss:
                started = time.monotonic()
                asyncio.run(apply_all(cluster, [endpoint(f"e{i:04d}", namespace) for i in range(count)]))
                applied = time.monotonic() - started
                done = asyncio.run(wait_converged(cluster, namespace, count, started))
                elapsed = time.monotonic() - started
            cpu = psutil.Process(operator.popen.pid).cpu_times() if operator.popen else None
            cpu_after = component_cpu(cluster)
            requests = api_requests(metrics_port)
        finally:
            operator.stop()
        cpu_seconds = (cpu.user + cpu.system) if cpu else 0.0
        return {
            "endpoints": count,
            "controllers": controllers,
            "workers": workers,
            "converged": done == (count, count),
            "with_status": done[0],
            "with_children": done[1],
            "apply_seconds": round(applied, 2),
            "converge_seconds": round(elapsed, 2),
            "operator_idle_rss_mb": round(idle_rss / 2**20, 1),
            "operator_peak_rss_mb": round(rss.peak / 2**20, 1),
            "operator_cpu_seconds": round(cpu_seconds, 2),
            "ms_per_endpoint_wall": round(1000 * elapsed / count, 2),
            "ms_per_endpoint_cpu": round(1000 * cpu_seconds / count, 2),
            "kb_per_endpoint_rss": round((rss.peak - idle_rss) / 1024 / count, 1),
            "control_plane_cpu_seconds": {
                name: round(cpu_after[name] - cpu_before.get(name, 0.0), 2) for name in cpu_after
            },
            "api_requests": requests,
            "api_requests_per_endpoint": round(sum(requests.values()) / count, 1),
            "goals": GOALS,
            "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version()},
        }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=16, help="the operator's --workers")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument(
        "--no-controllers",
        dest="controllers",
        action="store_false",
        help="no controller-manager, scheduler or kwok: no pods, operator cost alone",
    )
    args = parser.parse_args()
    result = run(args.count, args.controllers, args.workers)
    target = RESULTS if args.controllers else RESULTS.with_name("operator-no-controllers.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    ok = result["converged"] and result["converge_seconds"] < GOALS["seconds"]
    ok = ok and result["operator_peak_rss_mb"] < GOALS["rss_mb"]
    print(
        f"operator: {result['endpoints']} endpoints converged={result['converged']} in "
        f"{result['converge_seconds']} s (goal < {GOALS['seconds']:.0f} s), peak RSS "
        f"{result['operator_peak_rss_mb']} MB (goal < {GOALS['rss_mb']:.0f} MB), "
        f"{result['ms_per_endpoint_wall']} ms wall / {result['ms_per_endpoint_cpu']} ms CPU / "
        f"{result['kb_per_endpoint_rss']} KB RSS per endpoint -> {target.relative_to(ROOT)}"
    )
    print(f"operator: goals {'met' if ok else 'missed'}")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
