"""A real Kubernetes node on this machine: containerd (`containerd`), a kubelet (`kubelet`) and kube-proxy
(`proxy`) on a CNI bridge of their own (`network`), joined to the local control plane by
`Cluster.start_real_node` and undone by `Cluster.stop` or, after a killed run, by the next start (`host`).
Test and demo infrastructure: it needs root, and it leaves the host's kernel settings and forwarding alone.

What pods, tests and the control plane need to agree on with it is defined here.
"""

from __future__ import annotations

NODE_LABEL = "llm-endpoints.io/local-node"
# The node can be tainted so that only pods meant for it land there; they carry both.
NODE_TOLERATION = {"key": NODE_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
LOCAL_PLACEMENT = {"nodeSelector": {NODE_LABEL: "true"}, "tolerations": [NODE_TOLERATION]}
