"""Manifest -> operator -> Deployment -> scheduler -> kubelet -> serving image -> gateway -> real client.

One endpoint goes through its whole life in order: it comes up and streams, idles to zero, wakes for a
held request, refuses what exceeds the hold bounds, scales out under load and back in (streams intact),
and is deleted.
"""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import yaml
from huggingface_hub import InferenceClient
from prometheus_client.parser import text_string_to_metric_families

from llm_devstack.images import SERVING_IMAGE
from llm_devstack.node import LOCAL_PLACEMENT
from llm_devstack.waits import wait_for
from llm_operator.gateway.coldstart import PHASES
from tests.cluster.operator_support import get, kubectl_apply
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.cluster
NAME = "smollm2"
PROMPT = "Once upon a time,"


def status(stack: Stack, name: str = NAME) -> dict[str, Any]:
    body = get(stack.cluster, "llmendpoint", name, "-n", stack.namespace)
    return dict(body.get("status") or {})


def deployment(stack: Stack, name: str = NAME) -> dict[str, Any]:
    return get(stack.cluster, "deployment", name, "-n", stack.namespace)


def phase(stack: Stack, wanted: str, timeout: float, name: str = NAME) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        current = status(stack, name)
        return current if current.get("phase") == wanted else None

    return wait_for(reached, timeout, f"{name} to be {wanted}")


def stream(url: str, max_new_tokens: int = 12, token: str | None = None) -> tuple[list[str], Any]:
    """Streams through InferenceClient; returns the tokens and the final details."""
    client = InferenceClient(url, token=token, timeout=300)
    tokens, final = [], None
    for chunk in client.text_generation(PROMPT, max_new_tokens=max_new_tokens, stream=True, details=True):
        tokens.append(chunk.token.text)
        final = chunk
    return tokens, final


@pytest.fixture(scope="module")
def running(stack: Stack) -> Stack:
    """The endpoint applied with kubectl and Running."""
    kubectl_apply(stack.cluster, stack.endpoint(NAME))
    phase(stack, "Running", timeout=300)
    return stack


def test_1_apply_runs_and_streams_through_the_gateway(running: Stack) -> None:
    url = running.url(NAME)
    assert status(running)["url"] == url
    tokens, final = stream(url)
    assert len(tokens) == 12
    assert final.details.generated_tokens == 12
    assert final.generated_text == PROMPT + "".join(tokens)  # TGI's `/` returns the full text by default

    curl = subprocess.run(
        ["curl", "-sN", f"{url}/generate_stream", "-X", "POST", "-H", "Content-Type: application/json",
         "-d", json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": 5}})],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    events = [json.loads(line[5:]) for line in curl.stdout.splitlines() if line.startswith("data:")]
    assert len(events) == 5
    assert events[-1]["generated_text"]


def test_2_idle_endpoint_scales_to_zero(running: Stack) -> None:
    idle = phase(running, "ScaledToZero", timeout=120)
    assert deployment(running)["spec"]["replicas"] == 0
    ready = {c["type"]: c for c in idle["conditions"]}
    assert ready["ScaledToZero"]["status"] == "True"
    assert idle.get("lastRequestTime")
    wait_for(lambda: not pods(running), 60, "the serving pod to go away")


def pods(stack: Stack, name: str = NAME) -> list[dict[str, Any]]:
    listed = get(stack.cluster, "pods", "-n", stack.namespace, "-l", f"llm-endpoints.io/endpoint={name}")
    return list(listed.get("items", []))


def test_3_a_request_at_zero_is_held_and_answered_in_full(running: Stack) -> None:
    phase(running, "ScaledToZero", timeout=120)
    started = time.monotonic()
    tokens, final = stream(running.url(NAME), max_new_tokens=8)
    waited = time.monotonic() - started
    assert len(tokens) == 8
    assert final.details.finish_reason == "length"
    assert status(running)["phase"] == "Running"
    assert waited > 1  # it really had to wake a replica
    phases = wait_for(lambda: cold_start_phases(running) or None, 30, "the cold-start breakdown")
    assert set(phases) == set(PHASES)
    assert phases["trigger"] < 1 < phases["ready"] <= phases["first_byte"] < waited
    steps = [phases[p] for p in PHASES]  # pod phases have one-second resolution: allow that much
    assert all(earlier <= later + 1 for earlier, later in itertools.pairwise(steps))


def cold_start_phases(stack: Stack) -> dict[str, float]:
    """The gateway's cold-start breakdown for the endpoint: mean seconds per phase."""
    text = httpx.get(f"{stack.gateway_process.admin_url}/metrics", timeout=10).text
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "llm_gateway_cold_start_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("endpoint") != NAME or sample.labels.get("namespace") != stack.namespace:
                continue
            target = {"_sum": sums, "_count": counts}.get(sample.name.removeprefix(family.name))
            if target is not None:
                target[sample.labels["phase"]] = sample.value
    return {phase: sums[phase] / counts[phase] for phase in sums if counts.get(phase)}


def test_4_more_waiters_than_the_bound_get_503_with_retry_after(running: Stack) -> None:
    kubectl_apply(running.cluster, running.endpoint("cold", scaling={"minReplicas": 0, "maxReplicas": 1}))
    running.cluster.kubectl("scale", "deployment", "cold", "-n", running.namespace, "--replicas=0")
    wait_for(lambda: status(running, "cold").get("phase") == "ScaledToZero", 60, "cold at zero")
    url = f"{running.url('cold')}/generate"
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    with ThreadPoolExecutor(max_workers=5) as pool:
        futures = [pool.submit(httpx.post, url, json=body, timeout=300) for _ in range(5)]
        time.sleep(1)
        answers = [f.result() for f in futures]
    refused = [a for a in answers if a.status_code == 503]
    assert refused, [a.status_code for a in answers]
    assert all(a.headers["retry-after"].isdigit() for a in refused)
    assert all(a.json()["error_type"] for a in refused)
    assert sum(a.status_code == 200 for a in answers) == 3  # --max-held=3

    # back at zero, a request that gives the wake less time than a model load is refused, not left hanging
    running.cluster.kubectl("scale", "deployment", "cold", "-n", running.namespace, "--replicas=0")
    wait_for(lambda: not pods(running, "cold"), 180, "cold's pods to be gone")
    timed = httpx.post(url, json=body, headers={"X-Scale-Up-Timeout": "0.5"}, timeout=60)
    assert timed.status_code == 503, timed.text
    assert timed.headers["retry-after"].isdigit()
    assert timed.json()["error_type"] == "scale_up_timeout"


def test_5_protected_endpoint_needs_its_token(running: Stack) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "api-key", "namespace": running.namespace},
        "data": {"token": base64.b64encode(b"sesame").decode()},
    }
    kubectl_apply(running.cluster, secret)
    protected = running.endpoint(
        NAME, access="protected", apiKeySecretRef={"name": "api-key", "key": "token"}
    )
    kubectl_apply(running.cluster, protected)
    generate = f"{running.url(NAME)}/generate"
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}

    def refused_without_token() -> bool:
        return httpx.post(generate, json=body, timeout=300).status_code == 401

    def key_published() -> bool:
        probe = httpx.post(generate, json=body, headers={"Authorization": "Bearer nope"}, timeout=300)
        if probe.status_code == 503:  # protected, but the operator has not published the key's hash yet
            assert probe.json()["error_type"] == "api_key_unavailable", probe.text
            return False
        return True

    wait_for(refused_without_token, 60, "the gateway to enforce the token")
    wait_for(key_published, 60, "the operator to publish the key's hash")
    wrong = httpx.post(generate, json=body, headers={"Authorization": "Bearer nope"}, timeout=300)
    assert wrong.status_code == 401
    assert wrong.json()["error_type"]
    right = httpx.post(generate, json=body, headers={"Authorization": "Bearer sesame"}, timeout=300)
    assert right.status_code == 200, right.text
    kubectl_apply(running.cluster, running.endpoint(NAME))
    wait_for(lambda: httpx.post(generate, json=body, timeout=300).status_code == 200, 60, "public again")


CALLER = """
import socket, struct, sys, urllib.error, urllib.request
with open("/proc/net/route") as table:  # the default route leads to the host, where the gateway listens
    via = next(int(r.split()[2], 16) for r in list(table)[1:] if r.split()[1] == "00000000")
host = socket.inet_ntoa(struct.pack("<L", via))
request = urllib.request.Request(
    f"http://{host}:{sys.argv[1]}{sys.argv[2]}", sys.argv[3].encode(), {"content-type": "application/json"}
)
try:
    with urllib.request.urlopen(request, timeout=120) as answer:
        print("answered", answer.status, flush=True)
except urllib.error.HTTPError as refused:
    print("answered", refused.code, flush=True)
"""


def call_from_a_pod(stack: Stack, path: str, body: dict[str, Any]) -> int:
    """POST through the gateway from a pod on the local node (inside the cluster network, with the serving
    image's Python): the status."""
    port = stack.gateway.rsplit(":", 1)[1]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "caller", "namespace": stack.namespace},
        "spec": {
            **LOCAL_PLACEMENT,
            "automountServiceAccountToken": False,
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "caller",
                    "image": SERVING_IMAGE,
                    "command": ["python", "-c", CALLER, port, path, json.dumps(body)],
                }
            ],
        },
    }
    kubectl_apply(stack.cluster, pod)

    def answered() -> str | None:
        text = stack.cluster.kubectl("logs", "caller", "-n", stack.namespace, check=False).stdout
        return next((line for line in text.splitlines() if line.startswith("answered")), None)

    try:
        line = wait_for(answered, 180, "the in-cluster caller's answer")
    finally:
        stack.cluster.kubectl("delete", "pod", "caller", "-n", stack.namespace, "--wait=false")
    return int(line.split()[1])


def test_5b_private_endpoint_answers_inside_the_cluster_network_only(running: Stack) -> None:
    kubectl_apply(running.cluster, running.endpoint(NAME, access="private"))
    path = f"/endpoints/{running.namespace}/{NAME}/generate"
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}

    def refused_outside() -> httpx.Response | None:
        answer = httpx.post(running.gateway + path, json=body, timeout=300)
        return answer if answer.status_code == 403 else None

    refused = wait_for(refused_outside, 60, "the gateway to refuse callers outside the cluster network")
    assert refused.json()["error_type"] == "forbidden"
    assert call_from_a_pod(running, path, body) == 200
    kubectl_apply(running.cluster, running.endpoint(NAME))
    wait_for(
        lambda: httpx.post(running.gateway + path, json=body, timeout=300).status_code == 200, 60, "public"
    )


def test_6_load_scales_out_and_back_with_streams_intact(running: Stack) -> None:
    results: list[tuple[list[str], Any]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            results.append(stream(running.url(NAME), max_new_tokens=48))

    workers = [threading.Thread(target=client) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: deployment(running)["spec"]["replicas"] == 2, 120, "scale-out to maxReplicas")
        wait_for(
            lambda: (deployment(running)["status"].get("readyReplicas") or 0) == 2, 300, "2 ready replicas"
        )
        # what the user applied is untouched by autoscaling: Argo CD and Flux see no drift
        applied = yaml.safe_dump(running.endpoint(NAME))
        diff = running.cluster.kubectl("diff", "-f", "-", input=applied, check=False)
        assert (diff.returncode, diff.stdout) == (0, "")
    finally:
        stop.set()
        for worker in workers:
            worker.join(300)
    assert results
    assert all(len(tokens) == 48 and final.details.finish_reason == "length" for tokens, final in results)

    wait_for(lambda: deployment(running)["spec"]["replicas"] <= 1, 120, "scale-in once the load stops")
    replica_history = []
    for _ in range(5):
        replica_history.append(deployment(running)["spec"]["replicas"])
        time.sleep(1)
    assert sorted(replica_history, reverse=True) == replica_history  # no flapping back up while idle
    phase(running, "ScaledToZero", timeout=180)


def test_7_a_rollout_during_a_long_stream_lets_it_finish(running: Stack) -> None:
    stream(running.url(NAME), max_new_tokens=2)  # awake
    phase(running, "Running", timeout=300)
    old_pods = {p["metadata"]["name"] for p in pods(running)}
    outcome: list[tuple[list[str], Any]] = []
    reader = threading.Thread(target=lambda: outcome.append(stream(running.url(NAME), max_new_tokens=600)))
    reader.start()
    time.sleep(2)
    kubectl_apply(running.cluster, running.endpoint(NAME, env=[{"name": "ROLLOUT", "value": "2"}]))
    wait_for(
        lambda: not old_pods & {p["metadata"]["name"] for p in pods(running)}, 300, "the old pod replaced"
    )
    reader.join(300)
    ((tokens, final),) = outcome
    assert final.details.finish_reason in ("length", "eos_token")
    assert len(tokens) == final.details.generated_tokens
    assert final.generated_text == PROMPT + "".join(tokens)


def test_8_delete_removes_children_and_the_gateway_forgets_it(running: Stack) -> None:
    running.cluster.kubectl(
        "delete", "llmendpoint", NAME, "-n", running.namespace, "--wait=true", "--timeout=120s"
    )
    wait_for(lambda: not deployment(running), 60, "the Deployment to be collected")
    wait_for(
        lambda: get(running.cluster, "service", NAME, "-n", running.namespace) == {}, 60, "the Service gone"
    )

    def not_found() -> httpx.Response | None:
        answer = httpx.post(f"{running.url(NAME)}/generate", json={"inputs": "x"}, timeout=30)
        return answer if answer.status_code == 404 else None

    assert wait_for(not_found, 60, "the gateway to answer 404").json()["error_type"]
