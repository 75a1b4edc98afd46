"""The local node agent: a kubelet stand-in for one Node, running its pods as local processes (`agent`) in
network namespaces of their own (`network`). Test and demo infrastructure; never for production.

Run it as `python -m llm_devstack.node_agent` (`Cluster.start_node_agent` does). What pods and the control
plane need to agree on with it is defined here.
"""

from __future__ import annotations

AGENT_LABEL = "llm-endpoints.io/local-node-agent"
# The node is tainted so that only pods meant for real local processes land on it; they carry both.
AGENT_TOLERATION = {"key": AGENT_LABEL, "operator": "Exists", "effect": "NoSchedule"}
AGENT_PLACEMENT = {"nodeSelector": {AGENT_LABEL: "true"}, "tolerations": [AGENT_TOLERATION]}
# The agent sets this variable (to the cluster's workdir) in every pod process, so that the control plane's
# stop() can sweep up whatever a pod left behind, even if the agent itself was killed.
POD_MARKER_ENV = "LLME_LOCAL_NODE_WORKDIR"
