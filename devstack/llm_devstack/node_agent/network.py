"""Pod networking for the local node agent (test and demo infrastructure): a network namespace per pod.

Each pod gets its own namespace joined to the host by a veth pair on a /30 of 10.245.0.0/16: the pod's
side is its IP, as in a cluster, so the pod may bind any port on 0.0.0.0, EndpointSlices accept the
address (they refuse loopback ones), and the gateway reaches it as it would reach a pod. The host side is
the pod's way back to the host, e.g. to the API server, which the pod knows as `kubernetes.default.svc`
(a name its serving certificate carries) through an /etc/hosts of its own (`ip netns exec` mounts
/etc/netns/<namespace>/hosts over /etc/hosts). Traffic never leaves this machine. Needs root and `ip`
(iproute2).

A service on this machine that pods and host processes must both reach at one URL (the stand-in Hub, which
the operator asks and whose URL it renders into pods) listens on all addresses and is named by
`node_address()`: a pod's default route leads to the host, which accepts traffic to any of its addresses.
"""

from __future__ import annotations

import ipaddress
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

POD_RANGE = ipaddress.ip_network("10.245.0.0/16")
API_SERVER_NAME = "kubernetes.default.svc"
"""The API server's name inside a pod: it resolves to the host side of the pod's link."""
NETNS_ETC = Path("/etc/netns")


class PodNetworkError(OSError):
    """A namespace or link could not be made."""


def node_address() -> str:
    """An IPv4 address of this machine that host processes and pods both reach: its first global one."""
    result = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True, check=False
    )
    for line in result.stdout.splitlines():
        address = ipaddress.ip_interface(line.split()[3]).ip
        if address not in POD_RANGE:  # pods' host-side links come and go with their pods
            return str(address)
    raise PodNetworkError(f"no global IPv4 address on this machine: {result.stderr.strip()}")


def ip(*args: str) -> None:
    """Runs `ip ARGS`, raising PodNetworkError with its message on failure."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PodNetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass(frozen=True)
class PodNetwork:
    """One pod's namespace and addresses."""

    namespace: str
    host_link: str
    host_address: str
    pod_address: str
    registry: Path

    @classmethod
    def create(cls, uid: str, registry: Path) -> PodNetwork:
        """Makes the namespace and veth pair for the pod `uid`; records it under `registry` for sweeping."""
        tag = uid.replace("-", "")[:8]
        namespace, host_link, pod_link = f"llme-{tag}", f"lh{tag}", f"lp{tag}"
        ip("netns", "add", namespace)
        registry.mkdir(parents=True, exist_ok=True)
        (registry / namespace).write_text(host_link)
        ip("link", "add", host_link, "type", "veth", "peer", "name", pod_link)
        ip("link", "set", pod_link, "netns", namespace)
        for _ in range(50):
            base = int(POD_RANGE.network_address) + 4 * random.randrange(POD_RANGE.num_addresses // 4)
            host, pod = str(ipaddress.ip_address(base + 1)), str(ipaddress.ip_address(base + 2))
            try:
                ip("addr", "add", f"{host}/30", "dev", host_link)
                break
            except PodNetworkError:
                continue  # taken by another pod: try another /30
        else:
            raise PodNetworkError("no free /30 in 10.245.0.0/16")
        ip("link", "set", host_link, "up")
        inside = ("netns", "exec", namespace, "ip")
        ip(*inside, "link", "set", "lo", "up")
        ip(*inside, "link", "set", pod_link, "name", "eth0")
        ip(*inside, "addr", "add", f"{pod}/30", "dev", "eth0")
        ip(*inside, "link", "set", "eth0", "up")
        ip(*inside, "route", "add", "default", "via", host)
        etc = NETNS_ETC / namespace
        etc.mkdir(parents=True, exist_ok=True)
        hosts = (
            f"127.0.0.1 localhost\n::1 localhost\n{host} {API_SERVER_NAME} kubernetes.default kubernetes\n"
        )
        (etc / "hosts").write_text(hosts)
        return cls(namespace, host_link, host, pod, registry)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside the pod's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def delete(self) -> None:
        delete(self.namespace, self.host_link, self.registry)


def delete(namespace: str, host_link: str, registry: Path) -> None:
    """Removes a pod's namespace and link (either may already be gone)."""
    for args in (("link", "del", host_link), ("netns", "del", namespace)):
        try:
            ip(*args)
        except PodNetworkError:
            continue
    shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)
    (registry / namespace).unlink(missing_ok=True)


def sweep(registry: Path) -> None:
    """Removes every namespace recorded under `registry` (what a killed agent left)."""
    for record in sorted(registry.glob("llme-*")) if registry.is_dir() else ():
        delete(record.name, record.read_text().strip(), registry)
