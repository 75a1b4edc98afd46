"""A real, local Kubernetes control plane for `make run`, the tests and the benchmarks.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as child processes on free
loopback ports, with certificates made at start and an admin kubeconfig; `start_real_node` adds a real node
(containerd, kubelet, kube-proxy: `llm_devstack.node`) that runs pods from the built images. The binaries
come from `make cluster-bin` (built from the Go modules in devstack/tools). Every wait is bounded; a
component that fails raises `ComponentError` naming it with the tail of its log. Children die with the
harness: each runs in its own process group, is stopped on exit, and gets SIGKILL from the kernel if the
harness itself dies.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import ipaddress
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from llm_devstack.node import containerd, host, kubelet, proxy
from llm_devstack.node import network as node_network
from llm_devstack.paths import ROOT, TOOLS
from llm_devstack.ports import free_port
from llm_devstack.processes import die_with_parent

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
NODE_BINARIES = ("kubelet", "kube-proxy")
"""What `make cluster-bin` builds for the real node (containerd, runc and the CNI plugins are Debian's)."""
SERVICE_RANGE = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = str(ipaddress.ip_network(SERVICE_RANGE)[1])
"""The `kubernetes` Service's ClusterIP (the first of SERVICE_RANGE): pods reach the API server there."""
NODE_READY_TIMEOUT = 120.0
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 40


class HarnessError(RuntimeError):
    """The control plane could not be brought up."""


class MissingBinaryError(HarnessError):
    """A control-plane binary has not been built."""


class ComponentError(HarnessError):
    """A component exited or never became healthy; the message carries its log's tail."""

    def __init__(self, component: str, problem: str, log_tail: str) -> None:
        super().__init__(f"{component} {problem}. Last lines of its log:\n{log_tail}")
        self.component = component


def versions() -> dict[str, str]:
    """The pinned tool versions from devstack/tools/versions.env."""
    pairs = {}
    for line in (TOOLS / "versions.env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def default_bin_dir() -> Path:
    """Where `make cluster-bin` puts the binaries ($LLME_BIN_DIR overrides); keyed like build.sh keys it."""
    if env := os.environ.get("LLME_BIN_DIR"):
        return Path(env)
    digest = hashlib.sha256((TOOLS / "versions.env").read_bytes()).hexdigest()[:8]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "llm-endpoints" / "cluster-bin" / f"{versions()['KUBERNETES_VERSION']}-{digest}" / "bin"


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, or a note that it is empty."""
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(text) or "(log is empty)"


@dataclass
class Process:
    """One running component."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL it after STOP_TIMEOUT."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # anything the component itself left behind


@dataclass
class GPUNode:
    """A kwok-simulated node advertising GPUs."""

    name: str
    gpus: int
    product: str = "NVIDIA-A100-SXM4-80GB"
    cpu: str = "96"
    memory: str = "1Ti"


DEFAULT_NODES = (
    GPUNode("gpu-a100-0", 8),
    GPUNode("gpu-a100-1", 8),
    GPUNode("gpu-l4-0", 1, product="NVIDIA-L4", cpu="16", memory="64Gi"),
)


@dataclass
class Cluster:
    """A local control plane. Use as a context manager, or call `start_*` and `stop` yourself."""

    workdir: Path
    bin_dir: Path = field(default_factory=default_bin_dir)
    ports: dict[str, int] = field(default_factory=dict)
    extra_args: Mapping[str, Sequence[str]] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    real_node: host.RealNode | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.pki = self.workdir / "pki"
        self.kubeconfig = self.workdir / "kubeconfig"
        for name in (
            "etcd",
            "etcd-peer",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
        ):
            self.ports.setdefault(name, free_port())
        self.server = f"https://127.0.0.1:{self.ports['kube-apiserver']}"

    # -- lifecycle -------------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, controllers: bool = True, nodes: Sequence[GPUNode] = DEFAULT_NODES) -> Cluster:
        """etcd and kube-apiserver; then, if asked, the controller manager, scheduler, kwok and nodes."""
        self._check_binaries(COMPONENTS if controllers else COMPONENTS[:2])
        self._write_pki()
        self._spawn(
            "etcd", self._etcd_args(), lambda: self._url_ok(f"http://127.0.0.1:{self.ports['etcd']}/health")
        )
        self._spawn("kube-apiserver", self._apiserver_args(), lambda: self._url_ok(self.server + "/readyz"))
        if controllers:
            launched = [
                (self._launch("kube-controller-manager", self._controller_manager_args()), "https"),
                (self._launch("kube-scheduler", self._scheduler_args()), "https"),
            ]
            if nodes:
                launched.append((self._launch("kwok", self._kwok_args()), "http"))
            for process, scheme in launched:  # launched together, so their start-ups overlap
                url = f"{scheme}://127.0.0.1:{self.ports[process.name]}/healthz"
                self._wait_healthy(process, functools.partial(self._url_ok, url))
            for node in nodes:
                self.add_gpu_node(node)
            self._wait_for(
                lambda: self._nodes_ready([n.name for n in nodes]), "kwok", "did not make the nodes Ready"
            )
        return self

    def stop(self) -> None:
        """Stops the real node (and what it changed on the host), then every component, newest first; safe
        to call twice."""
        self.stop_real_node()
        while self.processes:
            self.processes.pop().stop()

    def pids(self) -> list[int]:
        """Process ids of the running components."""
        return [p.popen.pid for p in self.processes]

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> dict[str, str]:
        """The last lines of each component's log, for a failing test's report."""
        return {p.name: tail(p.log, lines) for p in self.processes}

    # -- clients ---------------------------------------------------------------------------------------

    def api_client(self) -> k8s.ApiClient:
        """A `kubernetes` client authenticated as the admin (system:masters)."""
        return k8s_config.new_client_from_config(config_file=str(self.kubeconfig))

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Runs the built kubectl against this cluster."""
        argv = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise HarnessError(
                f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def add_gpu_node(self, node: GPUNode) -> None:
        """Registers a kwok-managed Node with `nvidia.com/gpu` capacity."""
        resources = {"cpu": node.cpu, "memory": node.memory, "pods": "110", "nvidia.com/gpu": str(node.gpus)}
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node.name,
                "annotations": {KWOK_ANNOTATION: "fake"},
                "labels": {
                    "kubernetes.io/hostname": node.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": node.product,
                    "nvidia.com/gpu.count": str(node.gpus),
                },
            },
            "status": {"capacity": resources, "allocatable": resources},
        }
        with self.api_client() as api:
            k8s.CoreV1Api(api).create_node(body)

    # -- processes -------------------------------------------------------------------------------------

    def _check_binaries(self, names: Sequence[str]) -> None:
        missing = [n for n in names if not (self.bin_dir / n).is_file()]
        if missing:
            raise MissingBinaryError(
                f"control-plane binaries not built: {', '.join(missing)} (looked in {self.bin_dir}). "
                "Run `make cluster-bin` to build them from Go modules."
            )

    def start_real_node(
        self,
        name: str = "local-0",
        gpus: int = 4,
        *,
        taint: bool = True,
        images: Sequence[Path] | None = None,
    ) -> host.RealNode:
        """Starts a real node on this machine (`llm_devstack.node`): containerd with `images` imported (OCI
        archives, by default all that `make images` built; one containerd holds at the same digest is
        skipped), then a kubelet and kube-proxy. Returns once the Node is Ready, labelled `NODE_LABEL=true`
        (tainted with it unless `taint` is false) and advertising `gpus` as `nvidia.com/gpu`, an extended
        resource: pods requesting it run on the CPU. One per machine: raises HarnessError naming a real node
        that is running already. `stop()` undoes it all."""
        from llm_devstack.images import archives  # images imports this module

        self._check_binaries(NODE_BINARIES)
        if missing := host.missing_packages():
            raise HarnessError(f"the real node needs {', '.join(missing)}: run `make system-packages`")
        archive_paths = list(archives().values()) if images is None else list(images)
        try:
            host.claim(name, self.workdir)
        except host.NodeError as error:
            raise HarnessError(str(error)) from error
        run_dir = host.node_dir(self.workdir)
        node = self.real_node = host.RealNode(
            name, gpus, taint, archive_paths, run_dir, self.bin_dir / "kube-proxy"
        )
        node_network.create_bridge()
        node_network.write_cni_config(run_dir / "cni", run_dir / "ipam")
        self._start_containerd(node)
        self._authorize_node()
        self._start_kubelet(node)
        self._advertise_gpus(name, gpus)
        self._start_kube_proxy(node)
        return node

    def _spawn_node_component(
        self,
        node: host.RealNode,
        name: str,
        command: list[str],
        healthy: Callable[[], bool],
        env: Mapping[str, str] | None = None,
        timeout: float = START_TIMEOUT,
    ) -> None:
        node.processes.append(self._spawn(name, command[1:], healthy, command[0], env, timeout))

    def _start_containerd(self, node: host.RealNode) -> None:
        """containerd, cleared of a killed run's containers, holding the node's images."""
        from llm_devstack.images import PAUSE_IMAGE  # images imports this module

        config = node.run_dir / "containerd.toml"
        config.write_text(containerd.config(sandbox_image=PAUSE_IMAGE, cni_conf_dir=node.run_dir / "cni"))
        self._spawn_node_component(
            node, "containerd", containerd.command(config), containerd.ready, containerd.env()
        )
        containerd.remove_containers()  # containerd's root still records a killed run's pods
        containerd.import_archives(node.images)
        if PAUSE_IMAGE not in containerd.images():
            raise HarnessError(f"containerd has no {PAUSE_IMAGE} (the pod sandbox image): run `make images`")

    def _start_kubelet(self, node: host.RealNode) -> None:
        """The kubelet with credentials from this cluster's CA, its cgroups and rshared root; until Ready."""
        run_dir = node.run_dir
        kubeconfig_file = kubelet.write_kubeconfig(self.pki, node.name, self.server, run_dir / "credentials")
        root_dir = run_dir / "kubelet"
        host.create_cgroups()
        host.bind_rshared(root_dir)
        config = run_dir / "kubelet.yaml"
        settings = kubelet.configuration(
            node_ip=node_network.node_ip(),
            client_ca=self.pki / "ca.crt",
            runtime_socket=containerd.SOCKET,
            pod_logs=run_dir / "pod-logs",
            cgroup_root=host.CGROUP,
            taint=node.taint,
        )
        config.write_text(yaml.safe_dump(settings))
        command = kubelet.command(
            self.bin_dir / "kubelet",
            config=config,
            kubeconfig_file=kubeconfig_file,
            root_dir=root_dir,
            node=node.name,
            node_ip=node_network.node_ip(),
            masks=kubelet.kernel_masks(run_dir / "kernel"),
        )
        # a Node kept from an earlier kubelet of this cluster still reads Ready: wait for this one's heartbeat
        ready = functools.partial(self._node_ready_since, node.name, datetime.datetime.now(datetime.UTC))
        env = {**os.environ, "PATH": kubelet.PATH}
        self._spawn_node_component(node, "kubelet", command, ready, env, NODE_READY_TIMEOUT)

    def _start_kube_proxy(self, node: host.RealNode) -> None:
        """kube-proxy with its own credentials, until its health endpoint answers."""
        kubeconfig_file = proxy.write_kubeconfig(
            self.pki, node.name, self.server, node.run_dir / "credentials"
        )
        self.ports.setdefault("kube-proxy", free_port())
        config = node.run_dir / "kube-proxy.yaml"
        settings = proxy.configuration(
            kubeconfig_file=kubeconfig_file,
            node=node.name,
            healthz_port=self.ports["kube-proxy"],
            metrics_port=free_port(),
        )
        config.write_text(yaml.safe_dump(settings))
        healthz = functools.partial(self._url_ok, f"http://127.0.0.1:{self.ports['kube-proxy']}/healthz")
        self._spawn_node_component(node, "kube-proxy", proxy.command(node.proxy_binary, config), healthz)

    def stop_real_node(self) -> host.RealNode | None:
        """Stops the real node and undoes what it changed on the host (see `llm_devstack.node.host`); returns
        the node that ran (its name, GPUs, taint and images start it again), or None."""
        node, self.real_node = self.real_node, None
        if node is not None:
            self.processes = [p for p in self.processes if p not in node.processes]
            node.stop()
        return node

    def _authorize_node(self) -> None:
        """RBAC for kubelets (the API server has no Node authorizer), and the `kubernetes` Service's endpoint
        on the node's address, where pods reach the API server (the server reconciles no endpoints itself)."""
        binding = {
            "metadata": {"name": kubelet.NODE_ROLE_BINDING},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:node",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}],
        }
        endpoints = {
            "metadata": {
                "name": "kubernetes",
                "labels": {
                    "kubernetes.io/service-name": "kubernetes",
                    "endpointslice.kubernetes.io/managed-by": "llm-endpoints.io",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [node_network.node_ip()], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": self.ports["kube-apiserver"], "protocol": "TCP"}],
        }
        with self.api_client() as api:
            for create, args in (
                (k8s.RbacAuthorizationV1Api(api).create_cluster_role_binding, (binding,)),
                (k8s.DiscoveryV1Api(api).create_namespaced_endpoint_slice, ("default", endpoints)),
            ):
                try:
                    create(*args)
                except k8s.ApiException as error:
                    if error.status != 409:  # there from an earlier node of this cluster
                        raise

    def _advertise_gpus(self, node: str, gpus: int) -> None:
        """`nvidia.com/gpu: gpus` in the Node's capacity and allocatable (the kubelet keeps extended
        resources others add)."""
        patch = [
            {"op": "add", "path": f"/status/{field}/nvidia.com~1gpu", "value": str(gpus)}
            for field in ("capacity", "allocatable")
        ]
        with self.api_client() as api:
            k8s.CoreV1Api(api).patch_node_status(node, patch)

    def _launch(
        self, name: str, args: list[str], executable: str | None = None, env: Mapping[str, str] | None = None
    ) -> Process:
        log = self.logs / f"{name}.log"
        argv = [executable or str(self.bin_dir / name), *args, *self.extra_args.get(name, ())]
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT if executable else self.workdir,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def _spawn(
        self,
        name: str,
        args: list[str],
        healthy: Callable[[], bool],
        executable: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = START_TIMEOUT,
    ) -> Process:
        process = self._launch(name, args, executable, env)
        self._wait_healthy(process, healthy, timeout)
        return process

    def _wait_healthy(
        self, process: Process, healthy: Callable[[], bool], timeout: float = START_TIMEOUT
    ) -> None:
        def ready() -> bool:
            if process.popen.poll() is not None:
                raise ComponentError(
                    process.name, f"exited with code {process.popen.returncode}", tail(process.log)
                )
            return healthy()

        self._wait_for(ready, process.name, "did not become healthy", timeout)

    def _wait_for(
        self, check: Callable[[], bool], name: str, problem: str, timeout: float = START_TIMEOUT
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        raise ComponentError(name, f"{problem} within {timeout:.0f}s", tail(self.logs / f"{name}.log"))

    # -- health ----------------------------------------------------------------------------------------

    def _url_ok(self, url: str) -> bool:
        """GET answers 200; over https with the admin client certificate (serving certs are self-signed)."""
        context = None
        if url.startswith("https:"):
            context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def _node_ready_since(self, name: str, since: datetime.datetime) -> bool:
        """The Node is Ready by a heartbeat at or after `since` (the API keeps whole seconds)."""
        with self.api_client() as api:
            nodes = k8s.CoreV1Api(api).list_node(field_selector=f"metadata.name={name}").items
        if not nodes:
            return False
        return any(
            c.type == "Ready" and c.status == "True" and c.last_heartbeat_time >= since.replace(microsecond=0)
            for c in nodes[0].status.conditions or ()
        )

    def _nodes_ready(self, names: Sequence[str]) -> bool:
        with self.api_client() as api:
            nodes = {n.metadata.name: n for n in k8s.CoreV1Api(api).list_node().items}
        return all(
            name in nodes
            and any(c.type == "Ready" and c.status == "True" for c in nodes[name].status.conditions or ())
            for name in names
        )

    # -- configuration ---------------------------------------------------------------------------------

    def _write_pki(self) -> None:
        """A CA, the apiserver's serving cert, an admin client cert, the service-account key and an unused
        front-proxy CA."""
        self.pki.mkdir(exist_ok=True)
        ca = trustme.CA(organization_name="llm-endpoints test cluster")
        ca.cert_pem.write_to_path(str(self.pki / "ca.crt"))
        ca.private_key_pem.write_to_path(str(self.pki / "ca.key"))
        # pods reach the API server by the `kubernetes` Service's ClusterIP, or the real node's address
        names = ("kubernetes", "kubernetes.default", "kubernetes.default.svc", KUBERNETES_SERVICE_IP)
        serving = ca.issue_cert("127.0.0.1", "localhost", *names, node_network.node_ip())
        serving.cert_chain_pems[0].write_to_path(str(self.pki / "apiserver.crt"))
        serving.private_key_pem.write_to_path(str(self.pki / "apiserver.key"))
        admin = ca.issue_cert("admin", common_name="admin", organization_name="system:masters")
        admin.cert_chain_pems[0].write_to_path(str(self.pki / "admin.crt"))
        admin.private_key_pem.write_to_path(str(self.pki / "admin.key"))
        ca.issue_cert("service-accounts").private_key_pem.write_to_path(str(self.pki / "sa.key"))
        # a front-proxy CA that signs nothing: the apiserver wants one, and no client can use it
        front_proxy = trustme.CA(organization_name="unused front proxy")
        front_proxy.cert_pem.write_to_path(str(self.pki / "proxy-ca.crt"))
        self.kubeconfig.write_text(yaml.safe_dump(self._kubeconfig()))

    def _kubeconfig(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {"server": self.server, "certificate-authority": str(self.pki / "ca.crt")},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(self.pki / "admin.crt"),
                        "client-key": str(self.pki / "admin.key"),
                    },
                }
            ],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
            "current-context": "local",
        }

    def _etcd_args(self) -> list[str]:
        client_url = f"http://127.0.0.1:{self.ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return [
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--listen-metrics-urls=",
            "--unsafe-no-fsync",  # a throwaway test store: durability buys nothing here
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        pki = self.pki
        return [
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--requestheader-client-ca-file={pki / 'proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            f"--service-account-key-file={pki / 'sa.key'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--bind-address=0.0.0.0",  # pods of the real node reach it at the node's address
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports['kube-apiserver']}",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            # logs, exec and port-forward on the real node: the kubelet trusts the admin certificate
            f"--kubelet-client-certificate={pki / 'admin.crt'}",
            f"--kubelet-client-key={pki / 'admin.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            "--v=1",
        ]

    def _component_kubeconfig_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--v=1",
        ]

    def _controller_manager_args(self) -> list[str]:
        return [
            *self._component_kubeconfig_args(),
            f"--secure-port={self.ports['kube-controller-manager']}",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            f"--cert-dir={self.workdir / 'kcm-certs'}",
            "--use-service-account-credentials=false",
            "--concurrent-deployment-syncs=10",
            "--concurrent-replicaset-syncs=10",
            "--concurrent-gc-syncs=20",
            # no test takes a node away; a kubelet or kwok stalled by a busy machine must not make every
            # pod on its node NotReady (the default grace is 50 s)
            "--node-monitor-grace-period=5m",
        ]

    def _scheduler_args(self) -> list[str]:
        return [
            *self._component_kubeconfig_args(),
            f"--secure-port={self.ports['kube-scheduler']}",
            f"--cert-dir={self.workdir / 'scheduler-certs'}",
        ]

    def _kwok_args(self) -> list[str]:
        stages = sorted((self.bin_dir.parent / "kwok-stages").glob("*.yaml"))
        if not stages:
            raise MissingBinaryError(
                f"kwok stage files missing under {self.bin_dir.parent}: run `make cluster-bin`"
            )
        return [
            f"--kubeconfig={self.kubeconfig}",
            *(f"--config={s}" for s in stages),
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{self.ports['kwok']}",
            "--cidr=10.244.0.0/16",
            "--node-ip=10.244.0.1",
        ]


@contextlib.contextmanager
def running_cluster(
    *, controllers: bool = True, workdir: Path | None = None, keep: bool = False
) -> Iterator[Cluster]:
    """Starts a cluster in a fresh directory and stops it (and removes the directory unless `keep`)."""
    directory = workdir or Path(tempfile.mkdtemp(prefix="llme-cluster-"))
    cluster = Cluster(directory)
    try:
        yield cluster.start(controllers=controllers)
    finally:
        cluster.stop()
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
