"""containerd for the real node (Debian's, 1.6): its own config, root, state and socket, so it never meets a
containerd the machine may run. Its root (content, snapshots, image metadata) lives under `CACHE/node` and
outlives the run, so an image imported once stays; its state (sockets, runc state, pod network namespaces)
is swept whenever a node starts or stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path

from llm_devstack.node.network import CNI_PLUGINS
from llm_devstack.paths import CACHE

NODE_CACHE = CACHE / "node"
ROOT = NODE_CACHE / "containerd"
STATE = NODE_CACHE / "state"
SOCKET = STATE / "containerd.sock"
RUNC_ROOT = STATE / "runc"
NAMESPACE = "k8s.io"
"""The containerd namespace the CRI plugin, and so the kubelet, uses."""
SNAPSHOTTER = "overlayfs"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""containerd's PATH: its shim finds runc in /usr/sbin."""
IMPORT_TIMEOUT = 600.0


class ContainerdError(RuntimeError):
    """`ctr` failed."""


def config(*, sandbox_image: str, cni_conf_dir: Path) -> str:
    """containerd's config.toml (version 2).

    `restrict_oom_score_adj`: root here may lack CAP_SYS_RESOURCE, and a sandbox asking for a lower OOM score
    than containerd's own fails in runc. The sandbox image is a local one, so nothing is pulled; pod network
    namespaces are mounted under the state directory, where the sweep finds them.
    """
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    runc = '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]'
    return f"""version = 2
root = "{ROOT}"
state = "{STATE}"

[grpc]
  address = "{SOCKET}"

[ttrpc]
  address = "{SOCKET}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{ROOT / "opt"}"

{cri}
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

{cri[:-1]}.containerd]
  snapshotter = "{SNAPSHOTTER}"
  default_runtime_name = "runc"

{runc}
  runtime_type = "io.containerd.runc.v2"

{runc[:-1]}.options]
  Root = "{RUNC_ROOT}"
  SystemdCgroup = false

{cri[:-1]}.cni]
  bin_dir = "{CNI_PLUGINS}"
  conf_dir = "{cni_conf_dir}"
  max_conf_num = 1
"""


def command(config_file: Path) -> list[str]:
    return ["containerd", "--config", str(config_file), "--log-level", "warn"]


def env() -> dict[str, str]:
    return {**os.environ, "PATH": SYSTEM_PATH}


def ctr(*args: str, timeout: float = 60) -> str:
    """`ctr` against the node's containerd, in the CRI namespace."""
    command = ["ctr", "--address", str(SOCKET), "--namespace", NAMESPACE, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise ContainerdError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def ready() -> bool:
    """Whether containerd answers on its socket."""
    try:
        ctr("version", timeout=5)
    except (ContainerdError, subprocess.TimeoutExpired):
        return False
    return True


def archive_images(archive: Path) -> dict[str, str]:
    """The images an OCI archive holds: reference -> manifest digest (its index.json's names)."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        if member is None:
            raise ContainerdError(f"{archive} is not an OCI archive (no index.json)")
        index = json.load(member)
    return {
        entry["annotations"]["org.opencontainers.image.ref.name"]: entry["digest"]
        for entry in index["manifests"]
        if "org.opencontainers.image.ref.name" in entry.get("annotations", {})
    }


def images() -> dict[str, str]:
    """The images containerd has: reference -> target digest."""
    lines = ctr("images", "list").splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in lines if line.strip()}


def import_archives(archives: Sequence[Path]) -> list[str]:
    """Imports each OCI archive whose images containerd lacks (or holds at another digest), unpacked for the
    CRI's snapshotter; returns the references imported."""
    imported = []
    for archive in archives:
        wanted = archive_images(archive)
        have = images()
        missing = [ref for ref, digest in wanted.items() if have.get(ref) != digest]
        if not missing:
            continue
        # ctr names an OCI archive's images only under a base name they start with
        for base in sorted({ref.rsplit(":", 1)[0] for ref in missing}):
            ctr("images", "import", f"--snapshotter={SNAPSHOTTER}", f"--base-name={base}", str(archive),
                timeout=IMPORT_TIMEOUT)  # fmt: skip
        imported += missing
    after = images()
    for ref in imported:
        if ref not in after:
            raise ContainerdError(f"importing {ref} left containerd without it (has: {', '.join(after)})")
    if imported:
        prune(after)
    return imported


def prune(present: dict[str, str]) -> None:
    """Removes the images no name points to any more: the CRI refers to each image it saw by its id too
    (`sha256:...`), which keeps a replaced build's layers on disk until that reference goes."""
    named = {digest for ref, digest in present.items() if not ref.startswith("sha256:")}
    stale = [ref for ref, digest in present.items() if ref.startswith("sha256:") and digest not in named]
    if stale:
        ctr("images", "remove", "--sync", *stale)


def remove_containers() -> None:
    """Kills and deletes every task and container in the CRI namespace (what pods left); images stay. One
    that is gone by the time it is deleted is fine."""
    for kind, ids in (
        ("tasks", ctr("tasks", "list", "--quiet")),
        ("containers", ctr("containers", "list", "--quiet")),
    ):
        for name in ids.split():
            with contextlib.suppress(ContainerdError):
                ctr(kind, "delete", *(["--force"] if kind == "tasks" else []), name, timeout=30)
