"""The components as real subprocesses: `python -m llm_operator`, `python -m llm_operator.gateway`, and the
gateway over a routing table given on its command line (`llm_devstack.standalone_gateway`).

Each runs in a session of its own, is stopped with SIGTERM then SIGKILL, and gets SIGKILL from the kernel if
the process that started it dies; its output (JSON log lines) goes to a log file.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import httpx

from llm_devstack.paths import ROOT
from llm_devstack.ports import free_port
from llm_devstack.waits import wait_for

if TYPE_CHECKING:
    from llm_devstack.controlplane import Cluster


def die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the parent process dies, however it dies."""
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class ComponentProcess:
    """`python -m <module> <args>` as a real subprocess in a session of its own (killed if its parent dies);
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


class StandaloneGateway(GatewayPorts):
    """The gateway process (`llm_devstack.standalone_gateway`: the gateway's own flags and servers, the
    routing table given as `--route` flags) on free loopback ports. Started, it is ready once its admin port
    answers `/readyz`."""

    def __init__(self, log: Path, *args: str) -> None:
        flags = ["--host=127.0.0.1", "--log-level=warning"]
        super().__init__("llm_devstack.standalone_gateway", log, [*flags, *args])

    def start(self) -> Self:
        super().start()
        wait_for(self.ready, 15, f"the gateway ready (log: {self.log})", interval=0.05)
        return self

    def rss(self) -> int:
        """The process's resident memory, bytes (VmRSS of /proc/PID/status)."""
        assert self.popen is not None
        return vm_rss(self.popen.pid)


def vm_rss(pid: int) -> int:
    """VmRSS of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")
