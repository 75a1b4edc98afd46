"""What the real node changes on this host, and how each change is undone: the claim on the machine (one
real node at a time: kube-proxy's chains are global), the kubelet's rshared root directory, the cgroup tree
its pods run in, the bridge, the iptables chains, the mounts and processes pods leave. `sweep` undoes all of
it, after a clean stop and after a killed run alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from llm_devstack.node import containerd, network, proxy

CLAIM = containerd.NODE_CACHE / "claim.json"
CGROUP = "llm-endpoints-node"
"""The kubelet's cgroupRoot: pods live below it in every hierarchy, apart from any other kubelet's."""
CONTAINER_LOG_LINKS = Path("/var/log/containers")
"""Where every kubelet links its containers' logs (a fixed path)."""
FIXED_PATHS = (CONTAINER_LOG_LINKS, Path("/var/lib/kubelet"), Path("/run/containerd"), network.CNI_CACHE)
"""Fixed paths a kubelet (log links, device plugin sockets), containerd's shims (their sockets) and CNI (its
results cache) create whatever they are configured with: removed by the sweep where the node created them."""
KILL_TIMEOUT = 10.0
DEBIAN_PACKAGES = {
    "containerd": "containerd",
    "runc": "runc",
    str(network.CNI_PLUGINS / "bridge"): "containernetworking-plugins",
    "iptables": "iptables",
}
"""The commands the node runs, and the Debian packages (`make system-packages`) that bring them."""


class NodeError(RuntimeError):
    """The real node could not be set up, or another one is running."""


@dataclass(frozen=True)
class Claim:
    """The running node: its name, the cluster workdir its state lives in, and the process that started it."""

    node: str
    workdir: str
    pid: int
    started: float
    created: list[str]
    """The FIXED_PATHS that did not exist before the node started."""

    def alive(self) -> bool:
        with contextlib.suppress(psutil.Error):
            return bool(psutil.Process(self.pid).create_time() == self.started)
        return False

    @property
    def node_dir(self) -> Path:
        return node_dir(Path(self.workdir))


def node_dir(workdir: Path) -> Path:
    """Where a cluster keeps the node's per-run state: configs, credentials, the kubelet's root directory."""
    return workdir / "node"


def missing_packages() -> list[str]:
    return sorted(
        {p for c, p in DEBIAN_PACKAGES.items() if shutil.which(c, path=containerd.SYSTEM_PATH) is None}
    )


def current_claim() -> Claim | None:
    with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
        return Claim(**json.loads(CLAIM.read_text()))
    return None


def claim(node: str, workdir: Path) -> None:
    """Takes the machine for `node`, first sweeping what a killed run left; raises NodeError naming the node
    that is running."""
    previous = current_claim()
    if previous is not None and previous.alive():
        raise NodeError(
            f"a real node is already running on this machine: {previous.node} (cluster {previous.workdir}, "
            f"process {previous.pid}); only one can run at a time"
        )
    sweep(previous)
    CLAIM.parent.mkdir(parents=True, exist_ok=True)
    me = psutil.Process()
    created = [str(path) for path in FIXED_PATHS if not path.exists()]
    mine = Claim(node, str(workdir), me.pid, me.create_time(), created)
    CLAIM.write_text(json.dumps(dataclasses.asdict(mine)))


def release() -> None:
    CLAIM.unlink(missing_ok=True)


# -- mounts ----------------------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape")


def mounts_under(*roots: Path) -> list[Path]:
    """Mount points at or below any of `roots`, deepest first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = Path(_unescape(line.split()[4]))
        if any(point == root or root in point.parents for root in roots):
            found.append(point)
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_under(*roots: Path) -> None:
    for point in mounts_under(*roots):
        if subprocess.run(["umount", str(point)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(point)], capture_output=True, check=False)


def bind_rshared(path: Path) -> None:
    """Makes `path` a mount point of its own whose mounts propagate to every peer (the kubelet's root)."""
    path.mkdir(parents=True, exist_ok=True)
    for args in (["--bind", str(path), str(path)], ["--make-rshared", str(path)]):
        result = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise NodeError(f"mount {' '.join(args)}: {result.stderr.strip()}")


# -- cgroups ---------------------------------------------------------------------------------------------


def cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, a v2 tree)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2"):
            found.append(Path(_unescape(fields[4])))
    return found


def create_cgroups() -> None:
    """The kubelet's cgroupRoot in every hierarchy (it refuses a root that does not exist)."""
    for hierarchy in cgroup_hierarchies():
        path = hierarchy / CGROUP
        path.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):  # v1 cpuset starts empty: inherit the parent's
            if (path / name).exists() and not (path / name).read_text().strip():
                (path / name).write_text((hierarchy / name).read_text())


def _cgroup_pids() -> set[int]:
    pids = set()
    for hierarchy in cgroup_hierarchies():
        for directory, _, files in os.walk(hierarchy / CGROUP):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    pids |= {int(p) for p in (Path(directory) / "cgroup.procs").read_text().split()}
    return pids


def remove_cgroups() -> None:
    """Kills what still runs in the node's cgroups, then removes them, deepest first."""
    deadline = time.monotonic() + KILL_TIMEOUT
    while (pids := _cgroup_pids()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    for hierarchy in cgroup_hierarchies():
        for directory, _, _ in os.walk(hierarchy / CGROUP, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(directory)


# -- processes -------------------------------------------------------------------------------------------


def kill_node_processes(*paths: Path) -> None:
    """SIGKILLs every process whose command line names one of `paths` (containerd, its shims, a kubelet
    or kube-proxy of an earlier run); never this process or its ancestors."""
    spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    needles = [str(p) for p in paths]
    victims = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if process.pid not in spared and any(n in cmdline for n in needles):
            with contextlib.suppress(psutil.Error):
                process.kill()
                victims.append(process)
    psutil.wait_procs(victims, timeout=KILL_TIMEOUT)


# -- everything ------------------------------------------------------------------------------------------


def remove_log_links(pod_logs: Path) -> None:
    """The kubelet's links to its containers' logs that point into `pod_logs`."""
    for link in CONTAINER_LOG_LINKS.glob("*.log") if CONTAINER_LOG_LINKS.is_dir() else ():
        with contextlib.suppress(OSError):
            if link.is_symlink() and Path(os.readlink(link)).is_relative_to(pod_logs):
                link.unlink()


def sweep(node: Claim | None, proxy_binary: Path | None = None) -> None:
    """Undoes everything the node that made the claim `node` (with none, any real node) changed on the
    host, whether it stopped or was killed: its processes and its pods' processes, its mounts (the kubelet's
    root, pod volumes and network namespaces, container root filesystems), cgroups, kube-proxy's chains,
    the bridge, CNI's cached results, the fixed paths it created and containerd's state. containerd's root,
    with the imported images, stays."""
    dirs = [containerd.STATE, *([node.node_dir] if node else [])]
    kill_node_processes(containerd.NODE_CACHE, *dirs)
    remove_cgroups()
    unmount_under(*dirs, containerd.ROOT)
    if proxy_binary is not None:
        proxy.cleanup(proxy_binary)
    else:
        proxy.remove_chains()
    network.delete_bridge()
    network.remove_cni_results()
    if node is not None:
        remove_log_links(node.node_dir)
        for path in node.created:
            shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(containerd.STATE, ignore_errors=True)


class Stoppable(Protocol):
    """A started component (the control plane's `Process`)."""

    name: str

    def stop(self) -> None: ...


@dataclass
class RealNode:
    """A started real node (what it was started with), and what `Cluster.stop` stops and sweeps."""

    name: str
    gpus: int
    taint: bool
    images: list[Path]
    run_dir: Path
    proxy_binary: Path
    processes: list[Stoppable] = field(default_factory=list)

    def stop(self) -> None:
        """kube-proxy (and its rules) and the kubelet, then the pods' containers while containerd still
        runs, then containerd, then everything else the node changed; the claim last."""
        running = {process.name: process for process in self.processes}
        for name in ("kube-proxy", "kubelet"):
            if name in running:
                running[name].stop()
        if "containerd" in running:
            with contextlib.suppress(containerd.ContainerdError, subprocess.TimeoutExpired):
                containerd.remove_containers()
            running["containerd"].stop()
        sweep(current_claim(), self.proxy_binary)
        release()
