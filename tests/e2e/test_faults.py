"""Faults while 32 streams run through the gateway: no stream loses bytes, none hangs, none stays in flight.

Each case starts `STREAMS` TGI `/generate_stream` requests for one SmolLM2 endpoint, waits until every one
has its first token, applies one fault, and sorts the streams: *completed* (the final event, its tokens
numbered 1..n without a gap and adding up to its `generated_text`), *error event* (TGI's
`{"error", "error_type"}` event) or *lost* (anything else: a cut, a gap, a non-200, or no byte for
`READ_SECONDS`). While the fault happens, `FRESH` short streams are sent as new traffic: nothing of theirs
has been answered, so the gateway may try them on another replica, and every one must complete. The
endpoint's replicas are pinned (minReplicas = maxReplicas) so that only the fault moves them, and after
each case the gateway's `llm_gateway_requests_in_flight` must come back to 0.

(a) Rolling the gateway. The e2e gateway is a host process, not a Deployment, so the test plays a rolling
    update with maxSurge: a second gateway process starts, new traffic moves to it once its `/readyz` says
    ready (the client picks the gateway, standing in for the Service), and the old one gets SIGTERM with the
    chart's `--shutdown-grace-seconds`. Each stream stays on the gateway it started on; the old gateway
    must finish every one and exit by itself.
(b) Killing a serving pod: SIGKILL of the processes in the pod's container (this machine's processes in
    the container's cgroup), as an OOM kill or a crash does; the kubelet restarts the container. Its
    streams end with the gateway's `incomplete_generation` event, the others complete. And as a lost node
    looks to the gateway, a replica that goes silent (SIGSTOP) while its connections stay open: its streams
    end with an error event once the gateway's upstream read timeout passes.
(c) Scaling in from 2 to 1 replicas through the endpoint's scaling: the removed pod drains its streams.
(d) Restarting the operator: nothing changes meanwhile (replicas, pods, phase Running).
Then, for protected endpoints (issue 10, finding 7): a serving pod called directly, not through the
gateway, refuses a request without the endpoint's token and answers one with it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import pytest
from kubernetes import client as k8s
from prometheus_client.parser import text_string_to_metric_families

from llm_devstack.node.network import POD_RANGE
from llm_devstack.processes import GatewayProcess
from llm_devstack.waits import wait_for
from llm_operator.contract import ENDPOINT_LABEL, IN_FLIGHT
from tests.cluster.operator_support import get, kubectl_apply
from tests.cluster.test_chart import render
from tests.e2e.conftest import Stack, container_processes, start_gateway

pytestmark = pytest.mark.cluster
NAME = "faults"
PROMPT = "Once upon a time,"
STREAMS = 32
MAX_NEW_TOKENS = 40
"""Long enough that every fault lands mid-stream, short enough for a case to take under two minutes."""
FIRST_TOKEN_SECONDS = 150.0
"""Bound for every stream to have its first token (32 prefills on two shared cores)."""
STREAM_SECONDS = 240.0
"""Bound for every stream to end once the fault is applied: one still open then counts as lost."""
READ_SECONDS = 60.0
"""Most seconds between two bytes of a stream: a longer silence is a hang (lost)."""
IN_FLIGHT_SECONDS = 30.0
SILENCE_SECONDS = 30
"""The gateway's upstream read timeout in the silent-replica case: above a first token's wait under load."""
FRESH = 8
"""Short streams started one by one while the fault happens: nothing was answered yet, so none may fail."""
FRESH_TOKENS = 8
FRESH_SPACING = 1.0
TWO = {"minReplicas": 2, "maxReplicas": 2, "targetConcurrency": 16}
ONE = {"minReplicas": 1, "maxReplicas": 1, "targetConcurrency": 16}
GENERATION = {"maxInputTokens": 64, "maxTotalTokens": 256, "maxConcurrentRequests": STREAMS}
TOKEN = "open-sesame"


@dataclass
class Stream:
    """One streamed request and how it ended."""

    url: str
    max_new_tokens: int
    tokens: list[str] = field(default_factory=list)
    outcome: str = ""
    """"completed", "error" (TGI's error event) or "lost"; empty while it runs."""
    detail: str = ""
    ended: float = 0.0
    """`time.monotonic()` when it ended."""
    first_token: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": self.max_new_tokens, "details": True}}
        timeout = httpx.Timeout(READ_SECONDS, connect=10.0)
        try:
            with (
                httpx.Client(timeout=timeout) as client,
                client.stream("POST", f"{self.url}/generate_stream", json=body) as answer,
            ):
                if answer.status_code != 200:
                    self.end("lost", f"HTTP {answer.status_code}: {answer.read()[:300]!r}")
                    return
                for line in answer.iter_lines():
                    if line.startswith("data:") and self.event(json.loads(line[5:])):
                        return
            self.end("lost", f"the stream ended after {len(self.tokens)} tokens without a final event")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            self.end("lost", f"after {len(self.tokens)} tokens: {type(error).__name__}: {error}")
        finally:
            self.first_token.set()

    def event(self, event: dict[str, Any]) -> bool:
        """Record one SSE event; True once it ended the stream."""
        if "error" in event:
            self.end("error", f"{event.get('error_type')}: {event['error']}")
            return True
        token = event["token"]
        if event["index"] != len(self.tokens) + 1:
            self.end("lost", f"event {event['index']} after {len(self.tokens)} tokens")
            return True
        self.tokens.append("" if token["special"] else token["text"])
        self.first_token.set()
        if event.get("generated_text") is None:
            return False
        whole = len(self.tokens) == event["details"]["generated_tokens"]
        if whole and "".join(self.tokens) == event["generated_text"]:
            self.end("completed")
        else:
            self.end("lost", f"{len(self.tokens)} tokens do not add up to {event['generated_text']!r}")
        return True

    def end(self, outcome: str, detail: str = "") -> None:
        self.outcome, self.detail, self.ended = outcome, detail, time.monotonic()


@dataclass
class Tally:
    """How the streams of one case ended."""

    started: int
    completed: int
    errors: Counter[str]
    lost: list[str]
    seconds: float
    """From the fault to the last stream's end."""

    def __str__(self) -> str:
        return (
            f"started {self.started}, completed {self.completed}, error events {dict(self.errors)}, "
            f"lost {len(self.lost)}, the last ended {self.seconds:.0f}s after the fault"
        )


class Load:
    """`count` streams of `max_new_tokens` through `url`, each on a thread of its own, started `spacing`
    seconds apart."""

    def __init__(self, url: str, count: int, max_new_tokens: int, spacing: float = 0.0) -> None:
        self.streams = [Stream(url, max_new_tokens) for _ in range(count)]
        self.threads = [threading.Thread(target=s.run, daemon=True) for s in self.streams]
        self.starter = threading.Thread(target=self._start, args=(spacing,), daemon=True)
        self.starter.start()

    def _start(self, spacing: float) -> None:
        for thread in self.threads:
            thread.start()
            time.sleep(spacing)

    def running(self) -> None:
        """Wait until every stream has its first token; fail if one ended before the fault."""
        deadline = time.monotonic() + FIRST_TOKEN_SECONDS
        for stream in self.streams:
            stream.first_token.wait(max(0.0, deadline - time.monotonic()))
        early = [s.detail or s.outcome for s in self.streams if s.outcome]
        waiting = sum(not s.tokens for s in self.streams)
        assert not early, f"streams that ended before the fault: {early}"
        assert not waiting, f"{waiting} streams without a token after {FIRST_TOKEN_SECONDS}s"

    def finish(self, fault: float) -> Tally:
        """Wait (bounded) for every stream to end; one still open then is lost. `fault`: when the fault
        was applied (`time.monotonic()`)."""
        self.starter.join()
        deadline = time.monotonic() + STREAM_SECONDS
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for stream, thread in zip(self.streams, self.threads, strict=True):
            if thread.is_alive():
                stream.end("lost", f"still open after {STREAM_SECONDS}s with {len(stream.tokens)} tokens")
        outcomes = [s.outcome for s in self.streams]
        return Tally(
            started=len(self.streams),
            completed=outcomes.count("completed"),
            errors=Counter(s.detail.split(":")[0] for s in self.streams if s.outcome == "error"),
            lost=[s.detail for s in self.streams if s.outcome == "lost"],
            seconds=max(s.ended for s in self.streams) - fault,
        )


def in_flight(gateway: GatewayProcess, namespace: str) -> float:
    """The gateway's `llm_gateway_requests_in_flight` for the endpoint (0 once its series is dropped)."""
    text = httpx.get(f"{gateway.admin_url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == IN_FLIGHT
        for sample in family.samples
        if sample.labels == {"namespace": namespace, "endpoint": NAME}
    )


def settled(gateway: GatewayProcess, namespace: str) -> float:
    """Wait (bounded) for the gateway to count nothing in flight for the endpoint; the last reading."""
    readings: list[float] = []

    def zero() -> bool:
        readings.append(in_flight(gateway, namespace))
        return readings[-1] == 0

    wait_for(zero, IN_FLIGHT_SECONDS, "llm_gateway_requests_in_flight back to 0", interval=1)
    return readings[-1]


def url(gateway: GatewayProcess, namespace: str) -> str:
    return f"{gateway.url}/endpoints/{namespace}/{NAME}"


def pods(stack: Stack) -> list[dict[str, Any]]:
    listed = get(stack.cluster, "pods", "-n", stack.namespace, "-l", f"{ENDPOINT_LABEL}={NAME}")
    return list(listed.get("items", []))


def ready_pods(stack: Stack) -> list[dict[str, Any]]:
    """The endpoint's pods that are Ready and not terminating."""

    def ready(pod: dict[str, Any]) -> bool:
        conditions = pod.get("status", {}).get("conditions") or ()
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    return [p for p in pods(stack) if ready(p) and not p["metadata"].get("deletionTimestamp")]


def replicas_ready(stack: Stack, count: int) -> None:
    """Wait for exactly `count` ready pods, no other pods, and the Deployment at `count` replicas."""

    def reached() -> bool:
        deployment = get(stack.cluster, "deployment", NAME, "-n", stack.namespace)
        return (
            deployment.get("spec", {}).get("replicas") == count
            and len(pods(stack)) == count
            and len(ready_pods(stack)) == count
        )

    wait_for(reached, 300, f"{count} ready replicas of {NAME} and no others", interval=1)


def pod_address(pod: dict[str, Any]) -> str:
    """`ip:port` of a serving pod's http port."""
    ports = pod["spec"]["containers"][0]["ports"]
    port = next(p["containerPort"] for p in ports if p["name"] == "http")
    return f"{pod['status']['podIP']}:{port}"


def serving_in_flight(pod: dict[str, Any]) -> float:
    """The serving pod's own count of requests admitted and not finished."""
    text = httpx.get(f"http://{pod_address(pod)}/metrics", timeout=10).text
    return next(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "llm_serving_requests_in_flight"
        for sample in family.samples
    )


def chart_shutdown_grace(stack: Stack) -> str:
    """The gateway's `--shutdown-grace-seconds=N` flag as the chart renders it."""
    manifests = render(stack.cluster, f"gateway.internalCIDRs={{{POD_RANGE}}}")
    gateway = next(m for m in manifests if m["kind"] == "Deployment" and "gateway" in m["metadata"]["name"])
    args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    flag: str = next(a for a in args if a.startswith("--shutdown-grace-seconds="))
    return flag


def patch_scaling(stack: Stack, scaling: dict[str, int]) -> None:
    patch = json.dumps({"spec": {"scaling": scaling}})
    stack.cluster.kubectl("patch", "llmendpoint", NAME, "-n", stack.namespace, "--type=merge", "-p", patch)


@pytest.fixture(scope="module")
def faults(stack: Stack) -> Iterator[Stack]:
    """The endpoint at two ready replicas, each able to run every stream at once."""
    kubectl_apply(stack.cluster, stack.endpoint(NAME, scaling=TWO, generation=GENERATION))
    replicas_ready(stack, 2)
    try:
        yield stack
    finally:
        stack.cluster.kubectl("delete", "llmendpoint", NAME, "-n", stack.namespace, "--wait=false")


def streams_through(gateway: GatewayProcess, namespace: str) -> Load:
    """`STREAMS` streams, once each has its first token."""
    load = Load(url(gateway, namespace), STREAMS, MAX_NEW_TOKENS)
    load.running()
    return load


def fresh_streams(gateway: GatewayProcess, namespace: str) -> Load:
    """New traffic while the fault happens: `FRESH` short streams, one every `FRESH_SPACING` seconds."""
    return Load(url(gateway, namespace), FRESH, FRESH_TOKENS, FRESH_SPACING)


def complete(tally: Tally, count: int) -> bool:
    """All `count` streams completed, none lost."""
    return (tally.completed, tally.lost) == (count, [])


def test_1_rolling_the_gateway_finishes_its_streams(faults: Stack) -> None:
    """(a): 0 lost; the old gateway exits by itself once its streams are done, the new one serves."""
    grace = chart_shutdown_grace(faults)
    old = start_gateway(faults.cluster, faults.namespace, "e2e-gateway-old.log", grace)
    new: GatewayProcess | None = None
    try:
        wait_for(old.ready, 60, "the old gateway ready")
        load = streams_through(old, faults.namespace)
        new = start_gateway(faults.cluster, faults.namespace, "e2e-gateway-new.log", grace)
        wait_for(new.ready, 60, "the new gateway ready")
        fault = time.monotonic()
        old.signal(signal.SIGTERM)
        fresh = fresh_streams(new, faults.namespace)  # new traffic goes to the new gateway
        tally, moved = load.finish(fault), fresh.finish(fault)
        print(f"(a) rolling the gateway: {tally}; new traffic on the new gateway: {moved}")
        assert complete(tally, STREAMS), tally.lost
        assert complete(moved, FRESH), moved.lost
        assert old.popen is not None
        assert old.popen.wait(30) == 0, old.tail()
        print(f"(a) in flight after, on the new gateway: {settled(new, faults.namespace)}")
    finally:
        old.stop()
        if new is not None:
            new.stop()


def test_2_killing_a_serving_pod_ends_its_streams_with_an_error_event(faults: Stack) -> None:
    """(b): the killed pod's streams end with TGI's error event, never a hang; the others complete, and
    so do new requests sent meanwhile (nothing of theirs was answered: the gateway may try another pod)."""
    gateway = faults.gateway_process
    load = streams_through(gateway, faults.namespace)
    victim, *others = ready_pods(faults)
    carried = int(serving_in_flight(victim))
    assert carried
    assert all(serving_in_flight(pod) for pod in others)  # the gateway spread the streams
    killed = container_processes(victim)
    fault = time.monotonic()
    for process in killed:
        os.kill(process.pid, signal.SIGKILL)
    fresh = fresh_streams(gateway, faults.namespace)
    tally, new = load.finish(fault), fresh.finish(fault)
    print(f"(b) killing a pod that carried {carried} streams: {tally}; new requests: {new}")
    assert tally.lost == []
    assert tally.errors == Counter({"incomplete_generation": carried})
    assert tally.completed == STREAMS - carried
    assert complete(new, FRESH), new.lost
    print(f"(b) in flight after: {settled(gateway, faults.namespace)}")
    replicas_ready(faults, 2)  # the kubelet restarted the container


def test_3_a_replica_that_goes_silent_ends_its_streams_with_an_error_event(faults: Stack) -> None:
    """(b) as a lost node looks to the gateway (finding 11): the replica stops answering (SIGSTOP: no byte,
    no reset); its streams end with TGI's error event once `--upstream-read-timeout` passes, never a hang,
    and are not counted in flight afterwards; the others complete."""
    silence = f"--upstream-read-timeout={SILENCE_SECONDS}"
    gateway = start_gateway(faults.cluster, faults.namespace, "e2e-gateway-silent.log", silence)
    try:
        wait_for(gateway.ready, 60, "the gateway ready")
        load = streams_through(gateway, faults.namespace)
        victim, *_ = ready_pods(faults)
        carried = int(serving_in_flight(victim))
        stopped = container_processes(victim)
        fault = time.monotonic()
        try:
            for process in stopped:
                process.suspend()
            tally = load.finish(fault)
        finally:
            for process in stopped:
                with contextlib.suppress(psutil.NoSuchProcess):  # the liveness probe may have restarted it
                    process.resume()
        print(f"(b') a replica carrying {carried} streams goes silent: {tally}")
        assert tally.lost == []
        assert sum(tally.errors.values()) == carried
        assert tally.completed == STREAMS - carried
        print(f"(b') in flight after: {settled(gateway, faults.namespace)}")
    finally:
        gateway.stop()
    replicas_ready(faults, 2)


def test_4_restarting_the_operator_changes_nothing(faults: Stack) -> None:
    """(d): 0 lost; while the operator restarts, the replicas, the pods and the phase Running stay."""
    gateway = faults.gateway_process
    before = {p["metadata"]["name"] for p in pods(faults)}
    load = streams_through(gateway, faults.namespace)
    seen: list[tuple[Any, ...]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(faults, seen, stop), daemon=True)
    sampler.start()
    try:
        fault = time.monotonic()
        faults.operator.stop()
        fresh = fresh_streams(gateway, faults.namespace)
        faults.operator.start()
        wait_for(lambda: lease_holder(faults) == "e2e", 60, "the restarted operator to lead")
        tally, new = load.finish(fault), fresh.finish(fault)
    finally:
        stop.set()
        sampler.join(30)
    print(f"(d) restarting the operator: {tally}; new requests: {new}; {len(seen)} samples")
    assert complete(tally, STREAMS), tally.lost
    assert complete(new, FRESH), new.lost
    assert set(seen) == {("Running", 2, frozenset(before))}  # (phase, replicas, pods)
    print(f"(d) in flight after: {settled(gateway, faults.namespace)}")


def sample(stack: Stack, seen: list[tuple[Any, ...]], stop: threading.Event) -> None:
    """Every second until `stop`: the endpoint's phase, its Deployment's replicas and its pods' names."""
    api = stack.cluster.api_client()
    custom, apps, core = k8s.CustomObjectsApi(api), k8s.AppsV1Api(api), k8s.CoreV1Api(api)
    while not stop.wait(1):
        endpoint = custom.get_namespaced_custom_object(
            "llm-endpoints.io", "v1alpha1", stack.namespace, "llmendpoints", NAME
        )
        deployment = apps.read_namespaced_deployment(NAME, stack.namespace)
        listed = core.list_namespaced_pod(stack.namespace, label_selector=f"{ENDPOINT_LABEL}={NAME}")
        names = frozenset(p.metadata.name for p in listed.items)
        seen.append((endpoint.get("status", {}).get("phase"), deployment.spec.replicas, names))


def lease_holder(stack: Stack) -> str | None:
    """The holder of the operator's Lease in the stack's namespace, if there is one."""
    leases = get(stack.cluster, "leases", "-n", stack.namespace).get("items", [])
    holders = [lease["spec"].get("holderIdentity") for lease in leases]
    return next((h for h in holders if h), None)


def test_5_scaling_in_drains_the_removed_replica(faults: Stack) -> None:
    """(c): 0 lost while the endpoint goes from 2 replicas to 1, new requests sent meanwhile included."""
    gateway = faults.gateway_process
    load = streams_through(gateway, faults.namespace)
    fault = time.monotonic()
    patch_scaling(faults, ONE)
    fresh = fresh_streams(gateway, faults.namespace)
    tally, new = load.finish(fault), fresh.finish(fault)
    print(f"(c) scaling in from 2 to 1: {tally}; new requests: {new}")
    assert complete(tally, STREAMS), tally.lost
    assert complete(new, FRESH), new.lost
    print(f"(c) in flight after: {settled(gateway, faults.namespace)}")
    replicas_ready(faults, 1)


def test_6_a_protected_endpoints_pod_refuses_a_direct_call_without_its_token(faults: Stack) -> None:
    """Finding 7: the serving pod itself checks the endpoint's token; the gateway passes the caller's on."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{NAME}-key", "namespace": faults.namespace},
        "data": {"token": base64.b64encode(TOKEN.encode()).decode()},
    }
    protected = faults.endpoint(
        NAME,
        access="protected",
        apiKeySecretRef={"name": f"{NAME}-key", "key": "token"},
        scaling=ONE,
        generation=GENERATION,
    )
    kubectl_apply(faults.cluster, secret, protected)
    through_gateway = f"{url(faults.gateway_process, faults.namespace)}/generate"
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    wait_for(
        lambda: httpx.post(through_gateway, json=body, timeout=60).status_code == 401,
        60,
        "the gateway to enforce the token",
    )
    wait_for(lambda: rolled_out(faults), 300, "the protected endpoint's pods rolled out")
    (pod,) = ready_pods(faults)
    direct = f"http://{pod_address(pod)}"

    def answer(path: str = "/generate", headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.post(f"{direct}{path}", json=body, headers=headers, timeout=120)

    refused = answer()
    assert refused.status_code == 401, refused.text
    assert refused.json()["error_type"] == "unauthorized"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert answer(headers={"Authorization": "Bearer nope"}).status_code == 401
    assert answer("/generate_stream").status_code == 401
    assert answer(headers=bearer).status_code == 200
    assert httpx.get(f"{direct}/health", timeout=30).status_code == 200  # the probes need no token
    passed_on = httpx.post(through_gateway, json=body, headers=bearer, timeout=120)
    assert passed_on.status_code == 200, passed_on.text


def rolled_out(stack: Stack) -> bool:
    """The Deployment's current template runs on every pod, all ready, none left over."""
    deployment = get(stack.cluster, "deployment", NAME, "-n", stack.namespace)
    status: dict[str, Any] = deployment.get("status", {})
    wanted = deployment.get("spec", {}).get("replicas")
    return bool(
        status.get("observedGeneration") == deployment["metadata"]["generation"]
        and status.get("updatedReplicas") == wanted == status.get("readyReplicas")
        and len(pods(stack)) == wanted == len(ready_pods(stack))
    )
