"""kube-proxy for the real node, in iptables mode, leaving the host's sysctls alone (no conntrack tuning, no
`route_localnet` for localhost NodePorts); and the removal of its chains, which are global to the machine.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

from llm_devstack.node import credentials
from llm_devstack.node.network import POD_RANGE

TABLES = ("filter", "nat", "mangle")
COMMANDS = ("iptables", "ip6tables")
"""kube-proxy makes chains for both families where both work (this host may have IPv6 addresses)."""
CHAIN_PREFIX = "KUBE-"
USER = "system:kube-proxy"
"""The user the bootstrap ClusterRoleBinding `system:node-proxier` grants what kube-proxy needs."""


def configuration(
    *, kubeconfig_file: Path, node: str, healthz_port: int, metrics_port: int
) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig_file)},
        "mode": "iptables",
        "hostnameOverride": node,
        "clusterCIDR": str(POD_RANGE),
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        "iptables": {"localhostNodePorts": False},
    }


def write_kubeconfig(pki: Path, node: str, server: str, out: Path) -> Path:
    return credentials.write_kubeconfig(pki, out, "kube-proxy", server=server, user=USER)


def command(binary: Path, config: Path) -> list[str]:
    return [str(binary), f"--config={config}", "--v=1"]


def cleanup(binary: Path) -> None:
    """`kube-proxy --cleanup` (its rules in every mode), then the chains it leaves behind."""
    subprocess.run([str(binary), "--cleanup"], capture_output=True, timeout=60, check=False)
    remove_chains()


def _rules(command: str, table: str) -> list[str]:
    result = subprocess.run([command, "-w", "-t", table, "-S"], capture_output=True, text=True, check=False)
    return result.stdout.splitlines()


def chains() -> list[str]:
    """The kube-proxy chains (`KUBE-*`) on this host, as `command table chain`."""
    return [
        f"{command} {table} {rule.split()[1]}"
        for command in COMMANDS
        for table in TABLES
        for rule in _rules(command, table)
        if rule.startswith(f"-N {CHAIN_PREFIX}")
    ]


def remove_chains() -> None:
    """Removes every `KUBE-*` chain and the rules jumping to them (what `kube-proxy --cleanup` leaves
    behind, and everything after a killed run)."""
    for command in COMMANDS:
        for table in TABLES:
            rules = [shlex.split(rule) for rule in _rules(command, table)]
            for words in rules:
                if (
                    words[0] == "-A"
                    and not words[1].startswith(CHAIN_PREFIX)
                    and any(w.startswith(CHAIN_PREFIX) for w in words[2:])
                ):
                    subprocess.run(
                        [command, "-w", "-t", table, "-D", *words[1:]], capture_output=True, check=False
                    )
            names = [words[1] for words in rules if words[0] == "-N" and words[1].startswith(CHAIN_PREFIX)]
            for flag in ("-F", "-X"):
                for name in names:
                    subprocess.run([command, "-w", "-t", table, flag, name], capture_output=True, check=False)
