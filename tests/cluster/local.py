"""`make run`: the local control plane with the operator, until Ctrl-C.

Starts etcd, kube-apiserver, the controller manager, the scheduler and kwok GPU nodes, installs the
CRDs from crds/, starts the operator (`python -m llm_operator`) against it, applies the examples, and
prints how to reach the cluster. Everything stops on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from types import FrameType

from tests.cluster.harness import ROOT, Cluster, HarnessError

WORKDIR = ROOT / ".cache" / "run"


def _stop_on_sigterm() -> None:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main() -> int:
    """Runs the local control plane and operator in the foreground."""
    _stop_on_sigterm()
    shutil.rmtree(WORKDIR, ignore_errors=True)
    started = time.monotonic()
    print("make run: starting etcd, kube-apiserver, controller manager, scheduler and kwok GPU nodes ...")
    with Cluster(WORKDIR) as cluster:
        try:
            cluster.start()
        except HarnessError as error:
            print(f"make run: {error}", file=sys.stderr)
            return 1
        print(f"make run: control plane ready in {time.monotonic() - started:.1f}s")
        crds = sorted((ROOT / "crds").glob("*.yaml"))
        for crd in crds:
            cluster.kubectl("apply", "--server-side", "-f", str(crd))
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        operator_log = (WORKDIR / "logs" / "operator.log").open("ab")
        operator = subprocess.Popen(
            [sys.executable, "-m", "llm_operator"], env=env, stdout=operator_log, stderr=subprocess.STDOUT
        )
        kubectl = cluster.bin_dir / "kubectl"
        print(
            "\nThe local cluster is up (Ctrl-C stops everything):\n"
            f"  export KUBECONFIG={cluster.kubeconfig}\n"
            f"  {kubectl} get nodes -L nvidia.com/gpu.product\n"
            f"  {kubectl} apply -f examples/\n"
            f"  {kubectl} get llme -A\n"
            f"Logs: {WORKDIR / 'logs'}/ (one file per component; operator.log for the operator)\n"
        )
        try:
            while operator.poll() is None:
                time.sleep(0.5)
            print(f"make run: the operator exited with code {operator.returncode}; see {operator_log.name}")
            return 1
        except KeyboardInterrupt:
            print("\nmake run: stopping ...")
            return 0
        finally:
            operator.terminate()
            try:
                operator.wait(10)
            except subprocess.TimeoutExpired:
                operator.kill()
            operator_log.close()


if __name__ == "__main__":
    sys.exit(main())
