"""Cold-start breakdown of the local example: `make run`'s SmolLM2 endpoint woken from zero, several times.

Starts the same local system as `make run` (control plane, the real node with the built images already
imported, operator, gateway), applies examples/smollm2.yaml with the same weight cache as `make run` and
waits until it is Running. Then, each round:
scale the Deployment to zero and wait until no pod is left, send one request through the gateway
(huggingface_hub's InferenceClient, 8 new tokens) and read the gateway's
`llm_gateway_cold_start_seconds{phase}` for that wake. A watch on the endpoint's pods, opened before the
request, adds what the kubelet does, at this machine's clock rather than the pod timestamps' one second: the
pod bound, its sandbox ready (pause container and network: `PodReadyToStartContainers`), its container
running, the pod Ready; `container_start` is bound -> running (sandbox, container create and start by
containerd and runc, from the image already present). Prints each phase's mean, min and max in seconds since
the request arrived, with the client's own total; writes bench/results/cold_start.json.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import threading
import time
from typing import Any

import httpx
from huggingface_hub import InferenceClient
from kubernetes import client as k8s
from kubernetes import watch
from prometheus_client.parser import text_string_to_metric_families

from llm_devstack.controlplane import Cluster
from llm_devstack.paths import ROOT
from llm_devstack.stack import apply_example, local_stack, wait_running
from llm_devstack.waits import wait_for
from llm_operator.contract import ENDPOINT_LABEL
from llm_operator.gateway.coldstart import PHASES

WORKDIR = ROOT / ".cache" / "bench-cold-start"
RESULTS = ROOT / "bench" / "results" / "cold_start.json"
ROUNDS = 3
NAME = "smollm2"
NAMESPACE = "default"
WATCHED = ("pod_bound", "sandbox_ready", "container_running", "pod_ready")
"""What the pod watch marks, in the order the kubelet gets there."""


def phase_sums(admin_url: str) -> dict[str, float]:
    """Sum of observed seconds per cold-start phase of the endpoint, as the gateway exports them."""
    text = httpx.get(f"{admin_url}/metrics", timeout=10).text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "llm_gateway_cold_start_seconds":
            for sample in family.samples:
                if sample.name.endswith("_sum") and sample.labels.get("endpoint") == NAME:
                    sums[sample.labels["phase"]] = sample.value
    return sums


def reached(pod: Any) -> set[str]:
    """Which of WATCHED a pod object shows."""
    true = {c.type for c in (pod.status and pod.status.conditions) or () if c.status == "True"}
    running = any(s.state and s.state.running for s in (pod.status and pod.status.container_statuses) or ())
    marks = {"pod_bound"} if pod.spec.node_name else set()
    marks |= {"sandbox_ready"} if "PodReadyToStartContainers" in true else set()
    marks |= {"container_running"} if running else set()
    return marks | ({"pod_ready"} if "Ready" in true else set())


class PodWatch:
    """Seconds since `started` (time.monotonic) at which a watch of the endpoint's pods first saw each of
    WATCHED; opened at the pods' current resourceVersion, so nothing after it is missed."""

    def __init__(self, cluster: Cluster, started: float) -> None:
        self.api = cluster.api_client()
        self.core = k8s.CoreV1Api(self.api)
        self.selector = f"{ENDPOINT_LABEL}={NAME}"
        listed = self.core.list_namespaced_pod(NAMESPACE, label_selector=self.selector)
        self.version = listed.metadata.resource_version
        self.started = started
        self.marks: dict[str, float] = {}
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        stream = watch.Watch()
        for event in stream.stream(
            self.core.list_namespaced_pod,
            NAMESPACE,
            label_selector=self.selector,
            resource_version=self.version,
            timeout_seconds=600,
        ):
            seen = time.monotonic() - self.started
            for mark in reached(event["object"]):
                self.marks.setdefault(mark, seen)
            if "pod_ready" in self.marks:
                stream.stop()

    def result(self) -> dict[str, float]:
        """The marks once the pod was seen Ready (bounded), and `container_start` (bound -> running)."""
        self.thread.join(60)
        self.api.close()
        marks = dict(self.marks)
        if {"pod_bound", "container_running"} <= marks.keys():
            marks["container_start"] = marks["container_running"] - marks["pod_bound"]
        return marks


def main() -> int:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    rounds: list[dict[str, float]] = []
    with local_stack(WORKDIR) as stack:
        cluster = stack.cluster
        apply_example(cluster, NAMESPACE)
        status = wait_running(cluster, NAME, stack.processes)
        client = InferenceClient(status["url"], timeout=600)
        client.text_generation("Hello", max_new_tokens=1)  # warm caches (page cache, imports) once

        def no_pods() -> bool:
            listed = cluster.kubectl("get", "pods", "-l", f"{ENDPOINT_LABEL}={NAME}", "-o", "name")
            return not listed.stdout.strip()

        for number in range(1, ROUNDS + 1):
            cluster.kubectl("scale", "deployment", NAME, "--replicas=0")
            wait_for(no_pods, 300, "the endpoint's pods to be gone", interval=0.5)
            before = phase_sums(stack.gateway_admin_url)
            started = time.monotonic()
            pods = PodWatch(cluster, started)
            client.text_generation("Once upon a time,", max_new_tokens=8)
            total = time.monotonic() - started

            def recorded(seen: float = before.get("first_byte", 0.0)) -> bool:
                return phase_sums(stack.gateway_admin_url).get("first_byte", 0.0) > seen

            wait_for(recorded, 30, "this wake's breakdown", interval=0.5)
            after = phase_sums(stack.gateway_admin_url)
            this = {p: after[p] - before.get(p, 0.0) for p in PHASES}
            this |= pods.result()
            this["client_total"] = total
            rounds.append(this)
            print(f"round {number}: " + ", ".join(f"{k} {v:.2f}s" for k, v in this.items()), flush=True)

    print(f"\ncold start of the local example on the real node ({ROUNDS} wakes, seconds since the request)")
    print(f"{'phase':<18}{'mean':>8}{'min':>8}{'max':>8}")
    summary = {}
    for phase in [*PHASES, *WATCHED, "container_start", "client_total"]:
        values = [r[phase] for r in rounds if phase in r]
        if not values:
            continue
        summary[phase] = {"mean": statistics.mean(values), "min": min(values), "max": max(values)}
        print(f"{phase:<18}{summary[phase]['mean']:>8.2f}{min(values):>8.2f}{max(values):>8.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
