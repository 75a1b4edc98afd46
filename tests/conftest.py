"""Shared fixtures: the real local control plane, started once per session when a test asks for it, and the
real node (kubelet, containerd, kube-proxy) that runs the built images."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from llm_devstack.controlplane import Cluster

ADMISSION = "--enable-admission-plugins=OwnerReferencesPermissionEnforcement"
"""As hardened clusters run it: only who may update an owner's finalizers sets `blockOwnerDeletion` on its
children (`test_rbac.py` shows the chart's RBAC suffices)."""


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """etcd, kube-apiserver, controller manager, scheduler and kwok with three GPU nodes."""
    control_plane = Cluster(tmp_path_factory.mktemp("cluster"), extra_args={"kube-apiserver": [ADMISSION]})
    try:
        control_plane.start()
        yield control_plane
    finally:
        control_plane.stop()


@pytest.fixture(scope="session")
def local_node(cluster: Cluster) -> str:
    """The real node `local-0`: kubelet, containerd and kube-proxy on this machine, with the images of
    `make images` imported and 4 CPU-backed "GPUs" (`nvidia.com/gpu`; pods that request them run on the CPU).

    It is tainted: pods land there only with `llm_devstack.node.LOCAL_PLACEMENT`. One per machine, so every
    test that runs pods shares it (and the `cluster`)."""
    cluster.start_real_node("local-0", gpus=4)
    return "local-0"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test that used the control plane gets each component's log tail in its report."""
    report = yield
    control_plane = getattr(item, "funcargs", {}).get("cluster")
    if report.failed and isinstance(control_plane, Cluster):
        for name, text in control_plane.log_tails().items():
            report.sections.append((f"{name} log (tail)", text))
    return report
