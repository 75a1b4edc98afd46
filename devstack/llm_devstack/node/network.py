"""The real node's pod network: a Linux bridge holding the node's IP, and a CNI bridge network on it.

Pods get addresses of `POD_RANGE` from host-local IPAM and a default route via the bridge's address
(`node_ip()`), so a pod reaches every address of this host (the API server, a stand-in Hub, a host-run
gateway) and host processes reach pod IPs directly, all without forwarding: the CNI plugin neither acts as a
gateway nor masquerades (`isGateway: true` would switch the host's `net.ipv4.ip_forward` on). What this
leaves out: a pod reaching another pod through a ClusterIP Service (DNAT, then forwarding between bridge
ports through the host) does not work; host -> Service and pod -> the `kubernetes` Service (its endpoint is
this host) do. Needs root and `ip` (iproute2).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Any

POD_RANGE = ipaddress.ip_network("10.88.0.0/16")
BRIDGE = "llme0"
CNI_NETWORK = "llm-endpoints"
CNI_VERSION = "1.0.0"
CNI_PLUGINS = Path("/usr/lib/cni")
"""Where Debian's containernetworking-plugins installs the plugins."""
CNI_CACHE = Path("/var/lib/cni")
"""libcni's results cache (a fixed path): `<network>-<sandbox id>-eth0` and `cni-loopback-<id>-lo`."""


class NodeNetworkError(OSError):
    """The bridge could not be made or removed."""


def node_ip() -> str:
    """The bridge's address: the node's InternalIP, where pods and host processes reach this host."""
    return str(POD_RANGE.network_address + 1)


def _ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NodeNetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def bridge_exists() -> bool:
    return bool(_ip("-o", "link", "show", "dev", BRIDGE, check=False).strip())


def create_bridge() -> None:
    """The bridge, up, with the node's IP on it (the route to `POD_RANGE` comes with the address)."""
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{node_ip()}/{POD_RANGE.prefixlen}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def delete_bridge() -> None:
    """Removes the pods' veth pairs still on the bridge, then the bridge; either may be gone already."""
    if not bridge_exists():
        return
    for line in _ip("-o", "link", "show", "master", BRIDGE, check=False).splitlines():
        link = line.split(":")[1].strip().split("@")[0]
        _ip("link", "del", link, check=False)
    _ip("link", "del", BRIDGE)


def cni_config(ipam_dir: Path) -> dict[str, Any]:
    """The CNI network list containerd gives each pod sandbox; host-local keeps its leases in `ipam_dir`."""
    gateway = node_ip()
    return {
        "cniVersion": CNI_VERSION,
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": False,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(POD_RANGE), "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0", "gw": gateway}],
                    "dataDir": str(ipam_dir),
                },
            }
        ],
    }


def write_cni_config(conf_dir: Path, ipam_dir: Path) -> None:
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / f"10-{CNI_NETWORK}.conflist").write_text(json.dumps(cni_config(ipam_dir), indent=2))


def remove_cni_results() -> None:
    """The cached results of this network's attachments, and of their sandboxes' loopback (a sandbox
    removed without the CRI never had them deleted)."""
    results = CNI_CACHE / "results"
    for cached in results.glob(f"{CNI_NETWORK}-*-eth0"):
        sandbox = cached.name.removeprefix(f"{CNI_NETWORK}-").removesuffix("-eth0")
        cached.unlink(missing_ok=True)
        (results / f"cni-loopback-{sandbox}-lo").unlink(missing_ok=True)
