"""The local node agent — test and demo infrastructure that stands in for a kubelet; never for production.

There is no container runtime on the machines that run our tests, so this agent plays the kubelet for one
Node: it registers the Node with CPU-only "GPU" capacity (`nvidia.com/gpu`), and for each pod the
scheduler binds to it, it starts the first container's command and arguments as a local process (the
image is ignored: the command must exist on this machine, e.g. `torchrun` from the project's virtualenv)
with the container's environment resolved, in a network namespace of its own (`network`)
whose address it reports as the pod IP, so EndpointSlices and the gateway see a real pod address.

Like a kubelet it gives the process its ServiceAccount's identity: a kubeconfig holding a token issued for
that account (TokenRequest API), named by `KUBECONFIG`, so RBAC applies as in a cluster. It runs the
readiness probe to set Ready, restarts exited containers with back-off, sends SIGTERM and then SIGKILL
after the grace period when a pod is deleted, and writes each container's output to
`<workdir>/pods/<namespace>_<pod>/<container>.log`. An exited container is reported as the kubelet reports
it (`state.terminated`, then `waiting: CrashLoopBackOff` with the exit in `lastState.terminated`); with
`terminationMessagePolicy: FallbackToLogsOnError` and a non-zero exit its message is the tail of its log
(`termination_message`). The agent does not read `terminationMessagePath`: the process shares this
machine's filesystem, so there is no per-container file to mount there.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from llm_contract import HF_ENDPOINT_ENV
from llm_devstack.node_agent import AGENT_LABEL, POD_MARKER_ENV
from llm_devstack.node_agent.network import API_SERVER_NAME, PodNetwork, PodNetworkError
from llm_operator.objects import rfc3339

log = logging.getLogger("node-agent")
HEARTBEAT_SECONDS = 10
BACKOFF_MAX_SECONDS = 30
SHUTDOWN_GRACE_SECONDS = 3
FALLBACK_TO_LOGS = "FallbackToLogsOnError"
LOG_TAIL_LINES = 80
LOG_TAIL_BYTES = 2048
"""FallbackToLogsOnError takes the last 80 lines of the log, at most 2048 bytes, as the kubelet does."""


def now() -> str:
    """RFC 3339 timestamp for status fields."""
    return rfc3339(dt.datetime.now(dt.UTC))


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in commands, arguments and env values; $$ escapes."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]) if m[1] else "$", text
    )


def termination_message(log_tail: bytes) -> str:
    """What FallbackToLogsOnError takes of a failed container's log: its tail, within the kubelet's caps."""
    lines = log_tail[-LOG_TAIL_BYTES:].splitlines(keepends=True)[-LOG_TAIL_LINES:]
    return b"".join(lines).decode(errors="replace")


def exit_code(returncode: int) -> int:
    """A container's exit code: a process killed by signal N exits 128 + N, as under a shell or runtime."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(frozen=True)
class Termination:
    """How a container ended: the kubelet's `terminated` container state."""

    exit_code: int
    started_at: str
    finished_at: str
    message: str = ""

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "exitCode": self.exit_code,
            "reason": "Error" if self.exit_code else "Completed",
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        }
        if self.message:
            state["message"] = self.message
        return state


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass
class LocalPod:
    """One pod's container process, its probe loop and its reported status."""

    agent: NodeAgent
    pod: Any
    network: PodNetwork
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    restarts: int = 0
    started_at: str = ""
    waiting_reason: str = ""
    waiting_message: str = ""
    stopping: threading.Event = field(default_factory=threading.Event)
    log_start: int = 0
    """Where the running container's output begins in its log file (earlier runs come before)."""
    last_exit: Termination | None = None
    previous_exit: Termination | None = None
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Condition type -> (status, lastTransitionTime): the time moves only when the status does."""

    @property
    def ip(self) -> str:
        return self.network.pod_address

    @property
    def key(self) -> str:
        return f"{self.pod.metadata.namespace}/{self.pod.metadata.name}"

    @property
    def directory(self) -> Path:
        """This pod's files: container logs and its ServiceAccount kubeconfig."""
        path = self.agent.workdir / "pods" / f"{self.pod.metadata.namespace}_{self.pod.metadata.name}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def container(self) -> Any:
        return self.pod.spec.containers[0]

    def run(self) -> None:
        """Starts the container, restarts it with back-off while the pod lives, probes readiness."""
        backoff = 1.0
        while not self.stopping.is_set():
            try:
                self._start()
            except (OSError, ValueError, ApiException) as error:
                self.waiting_reason = "RunContainerError"
                log.warning("pod %s: cannot start its container: %s", self.key, error)
                self._report()
            else:
                self._probe_until_exit()
            if self.stopping.is_set():
                break
            if self.process is not None:
                self._report()  # state.terminated, as the kubelet shows an exit before its back-off
                self.restarts += 1
                self.waiting_reason = "CrashLoopBackOff"
                self.waiting_message = (
                    f"back-off {backoff:.0f}s restarting failed container={self.container.name} "
                    f"pod={self.pod.metadata.name}_{self.pod.metadata.namespace}"
                )
                self._report()
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)

    def _env(self) -> dict[str, str]:
        env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HOME": os.environ.get("HOME", "/root"),
            "HOSTNAME": self.pod.metadata.name,
            POD_MARKER_ENV: str(self.agent.workdir),
        }
        if not any(var.name == HF_ENDPOINT_ENV for var in self.container.env or ()):
            env["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "1")  # no Hub is reachable from here
        if self.pod.spec.automount_service_account_token is not False:
            kubeconfig = self.agent.service_account_kubeconfig(
                self.pod, self.directory, self.network.host_address
            )
            env["KUBECONFIG"] = str(kubeconfig)
        for var in self.container.env or ():
            env[var.name] = self.agent.resolve(self.pod, var, env)
        return env

    @property
    def log(self) -> Path:
        return self.directory / f"{self.container.name}.log"

    def _start(self) -> None:
        env = self._env()
        argv = [expand(a, env) for a in [*(self.container.command or ()), *(self.container.args or ())]]
        if not argv:
            raise ValueError("the container has no command: the agent cannot run images")
        with self.log.open("ab") as out:
            self.log_start = out.tell()
            self.process = subprocess.Popen(
                self.network.command(argv),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # no PDEATHSIG: it fires when the spawning thread ends, not the agent
            )
        self.started_at, self.ready, self.waiting_reason, self.waiting_message = now(), False, "", ""
        log.info("pod %s: started %s as pid %d on %s", self.key, argv[0], self.process.pid, self.ip)
        self._report()

    def _probe_until_exit(self) -> None:
        assert self.process is not None
        probe = self.container.readiness_probe
        period = (probe.period_seconds if probe else None) or 10
        failures_allowed = (probe.failure_threshold if probe else None) or 3
        failures = 0
        while self.process.poll() is None and not self.stopping.is_set():
            ok = self._probe_ok(probe)
            failures = 0 if ok else failures + 1
            ready = ok or (self.ready and failures < failures_allowed)
            if ready != self.ready:
                self.ready = ready
                self._report()
            self.stopping.wait(min(period, 1.0) if not self.ready else period)
        if self.process.poll() is not None and not self.stopping.is_set():
            code = exit_code(self.process.returncode)
            self.previous_exit = self.last_exit
            self.last_exit = Termination(code, self.started_at, now(), self._termination_message(code))
            self.ready = False
            log.warning("pod %s: container exited with code %d", self.key, code)

    def _termination_message(self, code: int) -> str:
        """The container's message: its log tail, under FallbackToLogsOnError when it failed."""
        if code == 0 or self.container.termination_message_policy != FALLBACK_TO_LOGS:
            return ""
        with self.log.open("rb") as written:
            size = written.seek(0, os.SEEK_END)
            written.seek(max(self.log_start, size - LOG_TAIL_BYTES))
            return termination_message(written.read())

    def _probe_ok(self, probe: Any) -> bool:
        if probe is None:
            return True
        if probe.http_get is None:
            return True  # exec and tcp probes are not run by this agent
        port = probe.http_get.port
        if isinstance(port, str):
            port = next(p.container_port for p in self.container.ports or () if p.name == port)
        url = f"http://{self.ip}:{port}{probe.http_get.path or '/'}"
        try:
            with urllib.request.urlopen(url, timeout=(probe.timeout_seconds or 1)) as response:
                return bool(200 <= response.status < 400)
        except OSError:
            return False

    def stop(self, grace: float) -> None:
        """SIGTERM the container's command (as a kubelet signals PID 1), SIGKILL what is left after `grace`.

        What is left includes every descendant: torchrun starts its ranks in sessions of their own."""
        self.stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            tree = process_tree(process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            _, alive = psutil.wait_procs(tree, timeout=grace)
            if alive:
                log.warning(
                    "pod %s: %d process(es) left after %.0fs grace; killing", self.key, len(alive), grace
                )
            for member in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
            psutil.wait_procs(alive, timeout=5)
            process.wait()
        self.network.delete()

    def _report(self) -> None:
        self.agent.report(self)

    def status(self) -> dict[str, Any]:
        """The pod status a kubelet would write for this container's state."""
        running = self.process is not None and self.process.poll() is None
        ready = "True" if running and self.ready else "False"
        exited = self.process is not None and not running and not self.waiting_reason
        if running:
            state: dict[str, Any] = {"running": {"startedAt": self.started_at}}
        elif exited and self.last_exit:
            state = {"terminated": self.last_exit.state()}
        else:
            waiting = {"reason": self.waiting_reason or "ContainerCreating"}
            state = {"waiting": waiting | ({"message": self.waiting_message} if self.waiting_message else {})}
        container_status: dict[str, Any] = {
            "name": self.container.name,
            "image": self.container.image,
            "imageID": "",
            "ready": ready == "True",
            "started": running,
            "restartCount": self.restarts,
            "state": state,
        }
        last = self.previous_exit if exited else self.last_exit
        if last:
            container_status["lastState"] = {"terminated": last.state()}
        return {
            "phase": "Running" if running or self.restarts else "Pending",
            "hostIP": "127.0.0.1",
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.started_at or now(),
            "conditions": [
                self._scheduled(),
                *(
                    self._condition(kind, value)
                    for kind, value in (("Initialized", "True"), ("ContainersReady", ready), ("Ready", ready))
                ),
            ],
            "containerStatuses": [container_status],
        }

    def _condition(self, kind: str, status: str) -> dict[str, str]:
        """A condition whose lastTransitionTime is when its status last changed, as a kubelet keeps it."""
        known = self.transitions.get(kind)
        if known is None or known[0] != status:
            known = self.transitions[kind] = (status, now())
        return {"type": kind, "status": status, "lastTransitionTime": known[1]}

    def _scheduled(self) -> dict[str, str]:
        """PodScheduled as the API server wrote it at binding (the kubelet leaves it alone)."""
        for condition in (self.pod.status and self.pod.status.conditions) or ():
            if condition.type == "PodScheduled" and condition.last_transition_time is not None:
                stamp = rfc3339(condition.last_transition_time)
                return {"type": "PodScheduled", "status": condition.status, "lastTransitionTime": stamp}
        return self._condition("PodScheduled", "True")


@dataclass
class NodeAgent:
    """Plays the kubelet for one Node."""

    api: k8s.ApiClient
    node: str
    gpus: int
    workdir: Path
    taint: bool = True
    pods: dict[str, LocalPod] = field(default_factory=dict)
    terminating: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api)

    def register(self) -> None:
        """Creates (or replaces) the Node with its capacity and a Ready condition."""
        capacity = {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": str(self.gpus)}
        body = {
            "metadata": {
                "name": self.node,
                "labels": {
                    "kubernetes.io/hostname": self.node,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    AGENT_LABEL: "true",
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": "local-cpu",
                    "nvidia.com/gpu.count": str(self.gpus),
                },
            },
            "spec": {
                "taints": [{"key": AGENT_LABEL, "value": "true", "effect": "NoSchedule"}]
                if self.taint
                else []
            },
        }
        with contextlib.suppress(ApiException):
            self.core.delete_node(self.node)
        self.core.create_node(body)
        self.core.patch_node_status(
            self.node,
            {"status": {"capacity": capacity, "allocatable": capacity, **self._node_conditions()}},
        )

    def _node_conditions(self) -> dict[str, Any]:
        stamp = now()
        healthy = {
            "MemoryPressure": "False",
            "DiskPressure": "False",
            "PIDPressure": "False",
            "Ready": "True",
        }
        return {
            "conditions": [
                {
                    "type": kind,
                    "status": value,
                    "reason": "LocalNodeAgent",
                    "message": "local node agent is running",
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": stamp,
                }
                for kind, value in healthy.items()
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node},
            ],
            "nodeInfo": {
                "kubeletVersion": "local-node-agent",
                "containerRuntimeVersion": "local://processes",
            },
        }

    def heartbeat(self) -> None:
        """Keeps the Node Ready so the node lifecycle controller does not taint it."""
        while not self.done.wait(HEARTBEAT_SECONDS):
            try:
                self.core.patch_node_status(self.node, {"status": self._node_conditions()})
            except ApiException as error:
                log.warning("heartbeat failed: %s", error.reason)

    def service_account_kubeconfig(self, pod: Any, directory: Path, host_address: str) -> Path:
        """A kubeconfig that authenticates as the pod's ServiceAccount, with a token the API server issues.

        The pod reaches the API server through its link to the host, under the name its certificate
        carries (`kubernetes.default.svc`, which the pod's /etc/hosts maps to that link): clients that
        ignore `tls-server-name` (kopf, aiohttp) verify it too."""
        account = pod.spec.service_account_name or "default"
        request = {"spec": {"audiences": [], "expirationSeconds": 86400}}
        token = self.core.create_namespaced_service_account_token(account, pod.metadata.namespace, request)
        admin = self.api.configuration
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {
                        "server": f"https://{API_SERVER_NAME}:{urlsplit(admin.host).port}",
                        "certificate-authority": admin.ssl_ca_cert,
                    },
                }
            ],
            "users": [{"name": account, "user": {"token": token.status.token}}],
            "contexts": [{"name": "pod", "context": {"cluster": "local", "user": account}}],
            "current-context": "pod",
        }
        path = directory / "kubeconfig"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def resolve(self, pod: Any, var: Any, env: dict[str, str]) -> str:
        """An env var's value: literal (with $(VAR) expansion), Secret or ConfigMap key, or pod field."""
        if var.value_from is None:
            return expand(var.value or "", env)
        source = var.value_from
        namespace = pod.metadata.namespace
        if source.secret_key_ref is not None:
            ref = source.secret_key_ref
            data = self.core.read_namespaced_secret(ref.name, namespace).data or {}
            return base64.b64decode(data[ref.key]).decode()
        if source.config_map_key_ref is not None:
            ref = source.config_map_key_ref
            return str((self.core.read_namespaced_config_map(ref.name, namespace).data or {})[ref.key])
        if source.field_ref is not None:
            fields = {
                "metadata.name": pod.metadata.name,
                "metadata.namespace": namespace,
                "metadata.uid": pod.metadata.uid,
                "spec.nodeName": self.node,
                "spec.serviceAccountName": pod.spec.service_account_name or "default",
                "status.podIP": pod.status.pod_ip or "",
                "status.hostIP": "127.0.0.1",
            }
            return str(fields.get(source.field_ref.field_path, ""))
        return ""

    def report(self, local: LocalPod) -> None:
        """Writes a pod's status."""
        if local.stopping.is_set():
            return
        try:
            self.core.patch_namespaced_pod_status(
                local.pod.metadata.name, local.pod.metadata.namespace, {"status": local.status()}
            )
        except ApiException as error:
            if error.status != 404:
                log.warning("pod %s: status update failed: %s", local.key, error.reason)

    def handle(self, pod: Any) -> None:
        """Starts pods bound here; stops and finalizes pods being deleted."""
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        with self.lock:
            local = self.pods.get(key)
            if pod.metadata.deletion_timestamp is None and local is None:
                try:
                    network = PodNetwork.create(pod.metadata.uid, self.workdir / "netns")
                except PodNetworkError as error:
                    log.error("pod %s: no network for it: %s", key, error)
                    return
                local = LocalPod(self, pod, network)
                self.pods[key] = local
                threading.Thread(target=local.run, name=f"pod-{key}", daemon=True).start()
                return
            if pod.metadata.deletion_timestamp is None or key in self.terminating:
                return
            self.terminating.add(key)
        threading.Thread(target=self._terminate, args=(key, pod, local), daemon=True).start()

    def _terminate(self, key: str, pod: Any, local: LocalPod | None) -> None:
        """Graceful stop, then the final delete that a kubelet issues once the containers are gone."""
        log.info("pod %s: deleted; stopping its containers", key)
        if local is not None:
            grace = pod.metadata.deletion_grace_period_seconds
            local.stop(30 if grace is None else grace)
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
        with self.lock:
            self.pods.pop(key, None)
            self.terminating.discard(key)

    def watch_pods(self) -> None:
        """Follows the pods bound to this node until stopped."""
        selector = f"spec.nodeName={self.node}"
        while not self.done.is_set():
            try:
                for event in watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces, field_selector=selector, timeout_seconds=30
                ):
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.handle(event["object"])
                    if self.done.is_set():
                        return
            except (ApiException, OSError) as error:
                log.warning("pod watch interrupted: %s", error)
                time.sleep(1)

    def shutdown(self) -> None:
        """Stops every pod's processes, all at once (the node goes away with the agent)."""
        self.done.set()
        with self.lock:
            pods = list(self.pods.values())
        stoppers = [threading.Thread(target=local.stop, args=(SHUTDOWN_GRACE_SECONDS,)) for local in pods]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", default="local-0")
    parser.add_argument(
        "--gpus", type=int, default=4, help="nvidia.com/gpu capacity to advertise (CPU-backed)"
    )
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--no-taint", dest="taint", action="store_false", help="accept every pod (make run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    api = k8s_config.new_client_from_config(config_file=args.kubeconfig)
    agent = NodeAgent(api, args.node, args.gpus, args.workdir, args.taint)
    agent.register()

    def stop(signum: int, frame: object) -> None:
        agent.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=agent.heartbeat, daemon=True).start()
    print(json.dumps({"node": args.node, "gpus": args.gpus}), flush=True)
    agent.watch_pods()
    return 0
