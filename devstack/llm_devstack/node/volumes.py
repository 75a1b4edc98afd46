"""hostPath PersistentVolumes on the real node, bound in advance to one claim: a weight cache (`spec.cache`,
the pods' HF_HOME) that outlives the endpoint's pods without a volume provisioner."""

from __future__ import annotations

from pathlib import Path

import yaml

from llm_devstack.controlplane import Cluster
from llm_devstack.node import NODE_LABEL

HOST_STORAGE = "host"
"""The StorageClass of these volumes (it provisions nothing: each volume is made here, bound to its claim)."""


def host_volume(cluster: Cluster, namespace: str, claim: str, folder: Path, size: str) -> None:
    """A hostPath PersistentVolume of `size` on the real node, bound in advance to the claim `claim` of
    `namespace`: a pod mounting the claim sees `folder` (made writable for the images' non-root users)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o777)
    storage_class = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": HOST_STORAGE},
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "Immediate",
    }
    on_the_node = {"key": NODE_LABEL, "operator": "In", "values": ["true"]}
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-{claim}"},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": HOST_STORAGE,
            "persistentVolumeReclaimPolicy": "Retain",
            "claimRef": {"namespace": namespace, "name": claim},
            "hostPath": {"path": str(folder)},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [on_the_node]}]}},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([storage_class, volume]))
