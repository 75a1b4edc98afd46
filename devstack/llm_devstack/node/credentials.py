"""Client certificates for the real node's kubelet and kube-proxy, signed by the control plane's CA, and the
kubeconfigs that use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trustme
import yaml


def kubeconfig(server: str, ca: Path, cert: Path, key: Path) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "node", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "node"}}],
        "current-context": "local",
    }


def write_kubeconfig(
    pki: Path, out: Path, name: str, *, server: str, user: str, group: str | None = None
) -> Path:
    """`out/<name>.kubeconfig` for `user` (in `group`), its certificate signed by pki/ca.crt + pki/ca.key."""
    out.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA.from_pem((pki / "ca.crt").read_bytes(), (pki / "ca.key").read_bytes())
    issued = ca.issue_cert(name, common_name=user, organization_name=group)
    cert, key = out / f"{name}.crt", out / f"{name}.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    path = out / f"{name}.kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig(server, pki / "ca.crt", cert, key)))
    return path
