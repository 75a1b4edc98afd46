"""Shared fixtures: the real local control plane, started once per session when a test asks for it."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from llm_devstack.controlplane import Cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """etcd, kube-apiserver, controller manager, scheduler and kwok with three GPU nodes."""
    control_plane = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        control_plane.start()
        yield control_plane
    finally:
        control_plane.stop()


@pytest.fixture(scope="session")
def local_node(cluster: Cluster) -> str:
    """A Node with 4 CPU-backed "GPUs" whose pods the local node agent runs as real processes.

    It is tainted: pods land there only with `llm_devstack.node_agent.AGENT_PLACEMENT`.
    """
    cluster.start_node_agent("local-0", gpus=4)
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
