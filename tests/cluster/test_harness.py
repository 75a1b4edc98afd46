"""The harness fails loudly and cleans up: named components, log tails, bounded waits, no strays."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from llm_devstack.controlplane import COMPONENTS, Cluster, ComponentError, MissingBinaryError
from llm_devstack.paths import ROOT

pytestmark = pytest.mark.cluster

CHILD = """
import json, os, signal, sys
from pathlib import Path
from llm_devstack.controlplane import Cluster

mode, workdir = sys.argv[1], Path(sys.argv[2])
with Cluster(workdir) as cluster:
    cluster.start()
    print(json.dumps(cluster.pids()), flush=True)
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "raise":
        raise RuntimeError("a test failed inside the cluster")
"""


def strays(pids: list[int], workdir: Path) -> list[str]:
    """Processes still alive that the harness started, by pid or by a command line naming its workdir."""
    alive = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(process.info["cmdline"] or ())
        if process.info["pid"] in pids or str(workdir) in cmdline:
            alive.append(f"{process.info['pid']}: {cmdline[:120]}")
    return alive


@pytest.mark.parametrize("mode", ["exit", "raise", "sigkill"])
def test_no_control_plane_process_outlives_its_harness(mode: str, tmp_path: Path) -> None:
    workdir = tmp_path / "cluster"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert child.stdout, f"the child harness did not start: {child.stderr[-2000:]}"
    pids = json.loads(child.stdout.splitlines()[0])
    assert len(pids) == len(COMPONENTS)
    expected_code = {"exit": 0, "raise": 1, "sigkill": -signal.SIGKILL}[mode]
    assert child.returncode == expected_code, child.stderr[-2000:]

    deadline = time.monotonic() + 15
    while (left := strays(pids, workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []


def test_missing_binaries_are_named_with_the_command_that_builds_them(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    with pytest.raises(MissingBinaryError) as error, Cluster(tmp_path / "c", bin_dir=empty) as cluster:
        cluster.start()
    message = str(error.value)
    assert all(name in message for name in COMPONENTS)
    assert "make cluster-bin" in message


def test_a_taken_port_names_the_component_and_shows_its_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        started = time.monotonic()
        with (
            pytest.raises(ComponentError) as error,
            Cluster(tmp_path, ports={"kube-apiserver": port}) as cluster,
        ):
            cluster.start(controllers=False)
    assert error.value.component == "kube-apiserver"
    assert "exited with code" in str(error.value)
    assert "address already in use" in str(error.value)
    assert time.monotonic() - started < 60


def test_a_component_that_fails_to_start_is_reported_with_its_log(tmp_path: Path) -> None:
    with (
        pytest.raises(ComponentError) as error,
        Cluster(tmp_path, extra_args={"etcd": ["--no-such-flag"]}) as cluster,
    ):
        cluster.start(controllers=False)
    assert error.value.component == "etcd"
    assert "no-such-flag" in str(error.value)
    assert cluster.processes == []
