"""The real node: a kubelet, containerd and kube-proxy on this machine run pods from the built images (here
`python3 -c` scripts in the operator image: Debian's Python with the operator installed), with the kubelet
enforcing limits, and leave the host as they found it."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from kubernetes import client as k8s

from llm_devstack.controlplane import Cluster, HarnessError
from llm_devstack.images import OPERATOR_IMAGE
from llm_devstack.node import LOCAL_PLACEMENT, NODE_LABEL, containerd, host, network, proxy
from llm_devstack.waits import wait_for

pytestmark = pytest.mark.cluster

HOST_SETTINGS = (
    "net/ipv4/ip_forward",
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/conf/all/route_localnet",
)
"""Kernel settings a kubelet, the CNI bridge plugin or kube-proxy changes by default; the real node must leave
them alone."""


def host_settings() -> dict[str, str]:
    return {name: (Path("/proc/sys") / name).read_text().strip() for name in HOST_SETTINGS}


AT_COLLECTION = host_settings()
"""Read when pytest imports this module, before any test of the session starts a node."""
POD_READY_TIMEOUT = 60.0
KILLED_RUN = """
import pathlib, sys, time
from llm_devstack.controlplane import Cluster
from llm_devstack.images import OPERATOR_IMAGE
cluster = Cluster(pathlib.Path(sys.argv[1]))
cluster.start(nodes=())
cluster.start_real_node("local-killed", gpus=1, taint=False, images=[pathlib.Path(p) for p in sys.argv[2:]])
image = [f"--image={OPERATOR_IMAGE}", "--image-pull-policy=Never"]
cluster.kubectl("run", "sleeper", *image, "--command", "--", "sleep", "600")
cluster.kubectl("wait", "pod/sleeper", "--for=condition=Ready", "--timeout=60s", timeout=70)
print("ready", flush=True)
time.sleep(600)
"""
"""A run that starts a node with a pod, then is killed (SIGKILL) leaving the pod's processes and mounts."""
HTTP_SERVER = """
import http.server, sys
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"hello from " + sys.argv[1].encode())
print("serving on 8080", flush=True)
http.server.HTTPServer(("0.0.0.0", 8080), Hello).serve_forever()
"""
WHO_AM_I = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount/"
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
url = f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews"
body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
headers = {"Authorization": "Bearer " + open(sa + "token").read(), "Content-Type": "application/json"}
context = ssl.create_default_context(cafile=sa + "ca.crt")
answer = urllib.request.urlopen(urllib.request.Request(url, body, headers), context=context)
print("user:", json.load(answer)["status"]["userInfo"]["username"], flush=True)
"""


@pytest.fixture
def core(cluster: Cluster) -> Iterator[k8s.CoreV1Api]:
    with cluster.api_client() as api:
        yield k8s.CoreV1Api(api)


@pytest.fixture
def namespace(core: k8s.CoreV1Api) -> Iterator[str]:
    name = f"node-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_for(
        lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
        30,
        "the default ServiceAccount",
    )
    yield name
    core.delete_namespace(name)


def pod(name: str, command: list[str], **container: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            **LOCAL_PLACEMENT,
            "terminationGracePeriodSeconds": 1,
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": OPERATOR_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": command,
                    **container,
                }
            ],
        },
    }


def python(script: str, *args: str) -> list[str]:
    return ["python3", "-c", script, *args]


def ready(core: k8s.CoreV1Api, namespace: str, name: str) -> k8s.V1Pod | None:
    found = core.read_namespaced_pod(name, namespace)
    conditions = found.status.conditions or ()
    return found if any(c.type == "Ready" and c.status == "True" for c in conditions) else None


def terminated(core: k8s.CoreV1Api, namespace: str, name: str) -> k8s.V1ContainerStateTerminated | None:
    statuses = core.read_namespaced_pod(name, namespace).status.container_statuses or ()
    return next((s.state.terminated for s in statuses if s.state.terminated), None)


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def test_the_node_is_ready_with_its_gpus_label_taint_and_bridge_address(
    core: k8s.CoreV1Api, local_node: str
) -> None:
    found = core.read_node(local_node)
    assert any(c.type == "Ready" and c.status == "True" for c in found.status.conditions)
    assert found.status.capacity["nvidia.com/gpu"] == "4"
    assert found.status.allocatable["nvidia.com/gpu"] == "4"
    assert found.metadata.labels[NODE_LABEL] == "true"
    assert [(t.key, t.value, t.effect) for t in found.spec.taints] == [(NODE_LABEL, "true", "NoSchedule")]
    addresses = {a.type: a.address for a in found.status.addresses}
    assert addresses["InternalIP"] == network.node_ip()
    assert found.status.node_info.container_runtime_version.startswith("containerd://")


def test_a_pod_serves_on_its_ip_with_probes_logs_and_exec(
    cluster: Cluster, core: k8s.CoreV1Api, namespace: str, local_node: str
) -> None:
    probe = {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
    gpu = {"limits": {"nvidia.com/gpu": "1"}}  # admitted against the advertised GPUs; runs on the CPU
    applied = time.monotonic()
    core.create_namespaced_pod(
        namespace, pod("web", python(HTTP_SERVER, "web"), readinessProbe=probe, resources=gpu)
    )
    running = wait_for(lambda: ready(core, namespace, "web"), POD_READY_TIMEOUT, "the pod Ready")
    print(f"pod Ready {time.monotonic() - applied:.1f} s after apply")
    assert running.spec.node_name == local_node
    assert ipaddress.ip_address(running.status.pod_ip) in network.POD_RANGE
    assert http_get(f"http://{running.status.pod_ip}:8080/") == "hello from web"
    assert "serving on 8080" in cluster.kubectl("logs", "-n", namespace, "web").stdout
    script = "import llm_operator; print(llm_operator.__name__)"  # in the image's environment
    exec_ = cluster.kubectl("exec", "-n", namespace, "web", "--", "python3", "-c", script)
    assert exec_.stdout.strip() == "llm_operator"


def test_the_projected_service_account_token_is_mounted(
    cluster: Cluster, core: k8s.CoreV1Api, namespace: str, local_node: str
) -> None:
    core.create_namespaced_pod(namespace, pod("sleeper", ["sleep", "600"]))
    wait_for(lambda: ready(core, namespace, "sleeper"), POD_READY_TIMEOUT, "the pod Ready")
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    read = cluster.kubectl("exec", "-n", namespace, "sleeper", "--", "cat", f"{sa}/namespace", f"{sa}/token")
    assert read.stdout.startswith(namespace)
    token = read.stdout[len(namespace) :]
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["sub"] == f"system:serviceaccount:{namespace}:default"
    assert claims["kubernetes.io"]["pod"]["name"] == "sleeper"  # bound to this pod: a projected token


def test_a_memory_limit_is_enforced(core: k8s.CoreV1Api, namespace: str, local_node: str) -> None:
    limits = {"limits": {"memory": "64Mi", "cpu": "500m"}}
    hog = python("block = b'x' * (512 << 20); print('survived', flush=True)")
    core.create_namespaced_pod(namespace, pod("hog", hog, resources=limits))
    state = wait_for(lambda: terminated(core, namespace, "hog"), POD_READY_TIMEOUT, "the container to end")
    assert (state.reason, state.exit_code) == ("OOMKilled", 137)


def test_a_cluster_ip_service_answers_from_the_host(
    core: k8s.CoreV1Api, namespace: str, local_node: str
) -> None:
    probe = {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
    core.create_namespaced_pod(namespace, pod("svc", python(HTTP_SERVER, "svc"), readinessProbe=probe))
    service = {
        "metadata": {"name": "svc"},
        "spec": {"selector": {"app": "svc"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    cluster_ip = core.create_namespaced_service(namespace, service).spec.cluster_ip
    wait_for(lambda: ready(core, namespace, "svc"), POD_READY_TIMEOUT, "the pod Ready")

    def answer() -> str | None:  # kube-proxy syncs its rules shortly after the endpoint is ready
        try:
            return http_get(f"http://{cluster_ip}/")
        except OSError:
            return None

    assert wait_for(answer, 30, f"the Service at {cluster_ip}") == "hello from svc"


def test_a_pod_reaches_the_api_server_with_its_token(
    cluster: Cluster, core: k8s.CoreV1Api, namespace: str, local_node: str
) -> None:
    core.create_namespaced_pod(namespace, pod("whoami", python(WHO_AM_I)))
    state = wait_for(lambda: terminated(core, namespace, "whoami"), POD_READY_TIMEOUT, "the container to end")
    logs = cluster.kubectl("logs", "-n", namespace, "whoami").stdout
    assert state.exit_code == 0, logs
    assert f"user: system:serviceaccount:{namespace}:default" in logs


def test_a_second_real_node_is_refused_naming_the_running_one(cluster: Cluster, local_node: str) -> None:
    with pytest.raises(HarnessError, match=f"already running on this machine: {local_node} "):
        cluster.start_real_node("local-1", gpus=1, images=[])


def node_traces(run_dir: Path) -> dict[str, Any]:
    """What a node leaves on the host while it runs: each must be gone after it stops."""
    return {
        "bridge": network.bridge_exists(),
        "chains": proxy.chains(),
        "mounts": host.mounts_under(run_dir, containerd.STATE, containerd.ROOT),
        "cgroups": [h / host.CGROUP for h in host.cgroup_hierarchies() if (h / host.CGROUP).exists()],
        "processes": [
            p
            for p in psutil.process_iter(["name", "cmdline"])
            if any(str(containerd.NODE_CACHE) in a or str(run_dir) in a for a in p.info["cmdline"] or ())
        ],
        "claim": host.CLAIM.exists(),
    }


@contextlib.contextmanager
def session_node_stopped(cluster: Cluster) -> Iterator[host.RealNode]:
    """Stops the session's node; starts it again afterwards unless the test did (later tests need it)."""
    running = cluster.stop_real_node()
    assert running is not None
    try:
        yield running
    finally:
        if cluster.real_node is None:
            cluster.start_real_node(running.name, running.gpus, taint=running.taint, images=running.images)


def test_stop_leaves_the_host_as_it_was_and_the_node_starts_again(
    cluster: Cluster, core: k8s.CoreV1Api, local_node: str
) -> None:
    """Restarts the session's node (pods bound to it are started again by the new kubelet)."""
    assert host_settings() == AT_COLLECTION
    running, claim = cluster.real_node, host.current_claim()
    assert running is not None
    assert claim is not None
    assert claim.created, "the kubelet and CNI paths this run made"
    traces = node_traces(running.run_dir)
    assert all(traces[name] for name in ("bridge", "chains", "mounts", "cgroups")), traces
    assert {"containerd", "kubelet", "kube-proxy"} <= {p.info["name"] for p in traces["processes"]}

    with session_node_stopped(cluster) as stopped:
        assert stopped is running
        left = node_traces(running.run_dir)
        assert left == {
            "bridge": False,
            "chains": [],
            "mounts": [],
            "cgroups": [],
            "processes": [],
            "claim": False,
        }
        assert [path for path in claim.created if Path(path).exists()] == []
        assert host_settings() == AT_COLLECTION

        started = time.monotonic()
        cluster.start_real_node(running.name, running.gpus, taint=running.taint, images=running.images)
        print(f"node Ready again {time.monotonic() - started:.1f} s after start_real_node (images kept)")
    assert containerd.import_archives(running.images) == []  # containerd holds them at the same digests
    assert core.read_node(local_node).status.allocatable["nvidia.com/gpu"] == str(running.gpus)
    assert host_settings() == AT_COLLECTION


def test_the_next_start_sweeps_what_a_killed_run_left(
    cluster: Cluster, core: k8s.CoreV1Api, local_node: str, tmp_path: Path
) -> None:
    """Stops the session's node, kills a run that started one with a pod, and starts the session's node
    again: its start removes what the killed run left."""
    killed_dir = tmp_path / "killed"
    with session_node_stopped(cluster) as running:
        images = [str(p) for p in running.images]
        run = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUN, str(killed_dir), *images], stdout=subprocess.PIPE, text=True
        )
        try:
            assert run.stdout is not None
            assert run.stdout.readline() == "ready\n"
        finally:
            run.kill()
            run.wait()
        left = node_traces(host.node_dir(killed_dir))
        assert all(left[name] for name in ("bridge", "chains", "mounts", "cgroups", "claim")), left
        assert "containerd-shim-runc-v2" in {p.info["name"] for p in left["processes"]}  # the pod outlived it

        cluster.start_real_node(running.name, running.gpus, taint=running.taint, images=running.images)
    assert not [p for p in left["processes"] if p.is_running()]
    assert host.mounts_under(killed_dir) == []
    claim = host.current_claim()
    assert claim is not None
    assert claim.workdir == str(cluster.workdir)
    found = core.read_node(local_node)
    assert any(c.type == "Ready" and c.status == "True" for c in found.status.conditions)
