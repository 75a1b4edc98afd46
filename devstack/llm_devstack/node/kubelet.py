"""The real node's kubelet: its configuration, its credentials, and the command line that starts it without
touching the host's kernel settings.

By default a kubelet rewrites `vm.overcommit_memory`, `kernel.panic` and `kernel.panic_on_oops`. Here it runs
with `protectKernelDefaults` (it only checks them) in a mount namespace of its own, where each setting that
differs from what it checks for is a file holding the expected value bind-mounted over /proc/sys; its root
directory is an rshared bind mount, so the volumes it mounts there reach containerd in the host's namespace.
Its PATH has no sbin directory, so it finds no iptables and creates no chains.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from llm_devstack.node import NODE_LABEL, credentials

KERNEL_DEFAULTS = {
    "vm/overcommit_memory": 1,
    "vm/panic_on_oom": 0,
    "kernel/panic": 10,
    "kernel/panic_on_oops": 1,
    "kernel/keys/root_maxkeys": 1000000,
    "kernel/keys/root_maxbytes": 25000000,
}
"""The /proc/sys values a kubelet checks for (k8s.io/kubernetes pkg/kubelet/cm `setupKernelTunables`)."""
PROC_SYS = Path("/proc/sys")
PATH = "/usr/local/bin:/usr/bin:/bin"
PORT = 10250
CLUSTER_DOMAIN = "cluster.local"
NODE_GROUP = "system:nodes"
NODE_ROLE_BINDING = "llm-endpoints:local-node"
"""Binds the bootstrap ClusterRole `system:node` to the group `system:nodes`: the API server authorises
with RBAC alone (no Node authorizer), and the role's own binding has no subjects."""


def write_kubeconfig(pki: Path, node: str, server: str, out: Path) -> Path:
    """The kubelet's kubeconfig: user `system:node:<node>` in group `system:nodes`."""
    return credentials.write_kubeconfig(
        pki, out, "kubelet", server=server, user=f"system:node:{node}", group=NODE_GROUP
    )


def configuration(
    *, node_ip: str, client_ca: Path, runtime_socket: Path, pod_logs: Path, cgroup_root: str, taint: bool
) -> dict[str, Any]:
    """The KubeletConfiguration: cgroup v1 and swap allowed, x509 and webhook authentication only, no
    read-only port, kernel settings only checked, no image garbage collection (imported images are not
    pulled back), eviction thresholds low enough for a developer's disk."""
    endpoint = f"unix://{runtime_socket}"
    taints = [{"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}] if taint else []
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{cgroup_root}",
        "failSwapOn": False,
        "containerRuntimeEndpoint": endpoint,
        "imageServiceEndpoint": endpoint,
        "address": node_ip,
        "port": PORT,
        "readOnlyPort": 0,
        "healthzPort": 0,
        "authentication": {
            "x509": {"clientCAFile": str(client_ca)},
            "webhook": {"enabled": True},
            "anonymous": {"enabled": False},
        },
        "authorization": {"mode": "Webhook"},
        "protectKernelDefaults": True,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "clusterDomain": CLUSTER_DOMAIN,
        "podLogsDir": str(pod_logs),
        "registerWithTaints": taints,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "2%",
            "imagefs.available": "2%",
            "nodefs.inodesFree": "2%",
        },
        "serializeImagePulls": False,
    }


def kernel_masks(directory: Path) -> dict[Path, Path]:
    """Files holding the value the kubelet expects for each setting the host has otherwise: file -> the
    /proc/sys file it is mounted over (only in the kubelet's mount namespace)."""
    directory.mkdir(parents=True, exist_ok=True)
    masks = {}
    for setting, value in KERNEL_DEFAULTS.items():
        target = PROC_SYS / setting
        if int(target.read_text().split()[0]) != value:
            source = directory / setting.replace("/", ".")
            source.write_text(f"{value}\n")
            masks[source] = target
    return masks


def command(
    binary: Path, *, config: Path, kubeconfig_file: Path, root_dir: Path, node: str, node_ip: str,
    masks: dict[Path, Path],
) -> list[str]:  # fmt: skip
    """The kubelet in a private mount namespace whose /proc is private (the masks never reach the host)
    and whose other mounts keep their propagation (the rshared root directory stays shared)."""
    mounts = ["mount --make-private /proc"]
    mounts += [shlex.join(["mount", "--bind", str(source), str(target)]) for source, target in masks.items()]
    script = " && ".join([*mounts, 'exec "$0" "$@"'])
    return [
        "unshare", "--mount", "--propagation", "unchanged", "--", "sh", "-c", script,
        str(binary),
        f"--config={config}",
        f"--kubeconfig={kubeconfig_file}",
        f"--root-dir={root_dir}",
        f"--cert-dir={root_dir / 'pki'}",
        f"--hostname-override={node}",
        f"--node-ip={node_ip}",
        f"--node-labels={NODE_LABEL}=true",
        "--v=1",
    ]  # fmt: skip
