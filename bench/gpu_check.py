"""The serving server on a GPU: engine probe, the real server, clients, batching equivalence, throughput.

Driven by bench/gpu_check.sh (one device run); also runs on CPU with a small model (see that script).

  probe  engine-level check that needs no tokenizer or HTTP: a tiny float32 random Llama, greedy tokens from
         `ModelRunner` steps (staggered arrivals over the paged KV cache) vs `model.generate` alone.
         Run once with the device's own transformers and once with the project's pinned one.
  full   builds a random-weight Llama (bf16 on GPU) with SmolLM2's tokenizer, starts `python -m llm_serving`,
         checks /health and /info, streams with huggingface_hub's InferenceClient, checks that requests
         alone equal the same requests in a concurrent batch, then measures sequential vs concurrent
         streaming throughput, TTFT and inter-token latency (and `model.generate` baselines as time allows).

Results: <out>/probe-<tag>.json, <out>/results.json, <out>/server.log, <out>/metrics.txt.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from llm_devstack.paths import ROOT

EQ_PROMPTS = [
    "Once upon a time,",
    "The quick brown fox",
    "In a galaxy far, far away there lived a",
    "Hello",
    "Numbers: one, two, three,",
    "Dear diary, today I",
]


def _bench_serving() -> Any:
    """bench/serving.py (start_server, stream_runs, run_generate, mixed_arrivals, PROMPTS), imported when
    first needed."""
    from bench import serving

    return serving


def _paged_runner(model: Any, rows: int, max_len: int) -> tuple[Any, list[tuple[int, ...]]]:
    """A ModelRunner over a paged KV cache with one disjoint block table of `max_len` tokens per row."""
    from llm_serving.engine.kv_cache import PagedKVCache, default_block_size
    from llm_serving.engine.runner import ModelRunner

    block = default_block_size(next(model.parameters()).device)
    per = -(-max_len // block)
    tables = [tuple(range(r * per, (r + 1) * per)) for r in range(rows)]
    return ModelRunner(model, PagedKVCache(model, rows * per, block)), tables


def _decode_plan(tables: list[tuple[int, ...]], starts: list[int]) -> Any:
    """Every row decodes token 5 at position `starts[row]`."""
    from llm_serving.engine.runner import RowPlan, StepPlan

    rows = (RowPlan((5,), s, t, True) for s, t in zip(starts, tables, strict=True))
    return StepPlan(rows=tuple(rows))


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------- probe


def probe(out: Path, tag: str) -> int:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_serving.engine.runner import RowPlan, StepPlan

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {
        "tag": tag,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
    }
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).to(device).eval()  # type: ignore[arg-type]
    result["forward_has_cache_kwarg"] = "cache" in inspect.signature(model.forward).parameters
    result["forward_has_past_key_values_kwarg"] = (
        "past_key_values" in inspect.signature(model.forward).parameters
    )
    rng = random.Random(7)
    prompts = [tuple(rng.randrange(3, 512) for _ in range(n)) for n in (5, 11, 8)]
    steps = 12
    reference: list[list[int]] = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=steps,
                do_sample=False,
                pad_token_id=0,
            )
            reference.append(gen[0, len(p) :].tolist())
    # Engine steps: prompt 0 alone for 3 steps, then prompts 1 and 2 join; each row leaves the step once it
    # has `steps` tokens.
    got: list[list[int]] = [[] for _ in prompts]
    arrive = {0: [0], 3: [1, 2]}
    order: list[int] = []  # request index of each batch row
    try:
        runner, tables = _paged_runner(model, len(prompts), max(map(len, prompts)) + steps)
        step = 0
        while any(len(g) < steps for g in got):
            kept = [r for r in order if len(got[r]) < steps]  # rows of the runner's batch still going
            new = arrive.get(step, [])
            step += 1
            if not kept and not new:
                continue
            decode = [
                RowPlan((got[r][-1],), len(prompts[r]) + len(got[r]) - 1, tables[r], True) for r in kept
            ]
            plan = StepPlan(rows=(*decode, *(RowPlan(prompts[r], 0, tables[r], True) for r in new)))
            logits = runner.execute(plan).logits
            order = kept + new
            for row, r in enumerate(order):
                got[r].append(int(logits[row].argmax()))
        result["engine_tokens"] = got
        result["error"] = None
    except Exception as exc:  # the point is to record what breaks
        result["engine_tokens"] = got
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["generate_tokens"] = reference
    result["match"] = result["error"] is None and got == reference
    write_json(out / f"probe-{tag}.json", result)
    log(
        f"probe[{tag}] transformers {result['transformers']} on {result['device']}: "
        f"forward(cache=) {result['forward_has_cache_kwarg']}, engine == generate: {result['match']}"
        + (f", error {result['error']}" if result["error"] else "")
    )
    if not result["match"]:
        for r, (a, b) in enumerate(zip(got, reference, strict=True)):
            log(f"  prompt {r}: engine {a}")
            log(f"  prompt {r}: generate {b}")
    return 0 if result["match"] else 1


# ------------------------------------------------------------------------------------------------ model


def build_model(target: Path, tokenizer_dir: Path, a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Sharper logits than the default 0.02: greedy choices are not near-ties that bf16 rounding flips.
        initializer_range=a.init_range,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    start = time.perf_counter()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.to(dtype)  # type: ignore[arg-type]
    params = sum(p.numel() for p in model.parameters())
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    info = {
        "parameters": params,
        "dtype": str(dtype),
        "hidden": a.hidden,
        "layers": a.layers,
        "intermediate": a.intermediate,
        "heads": a.heads,
        "kv_heads": a.kv_heads,
        "vocab": len(tokenizer),
        "init_range": a.init_range,
        "build_seconds": time.perf_counter() - start,
    }
    log(f"model: {params / 1e6:.1f}M parameters, {dtype}, built and saved in {info['build_seconds']:.1f} s")
    return info


# ----------------------------------------------------------------------------------------------- server


def serve(model_dir: Path, max_new: int, log_path: Path, dtype: str = "auto") -> Any:
    """bench/serving.py's server, as the GPU check runs it (batches up to 64)."""
    server = _bench_serving().start_server(
        str(model_dir), max_new, max_batch_size=64, dtype=dtype, log_path=log_path, timeout=300
    )
    log(f"server healthy after {server.seconds:.1f} s (health codes seen {server.health_seen})")
    return server


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def client_checks(url: str) -> dict[str, Any]:
    from huggingface_hub import InferenceClient

    res: dict[str, Any] = {}
    health = httpx.get(f"{url}/health")
    info = httpx.get(f"{url}/info")
    res["health_status"] = health.status_code
    res["info_status"] = info.status_code
    res["info"] = info.json()
    assert health.status_code == 200, health.text
    assert info.status_code == 200, info.text
    prompt = "Write a haiku about GPUs."
    client = InferenceClient(url)
    start = time.perf_counter()
    events = list(client.text_generation(prompt, max_new_tokens=16, stream=True, details=True))
    res["stream_seconds"] = time.perf_counter() - start
    streamed = "".join(e.token.text for e in events if not e.token.special)
    res["stream_events"] = len(events)
    res["stream_finish_reason"] = str(events[-1].details.finish_reason) if events[-1].details else None
    res["stream_generated_text"] = events[-1].generated_text
    plain = httpx.post(
        f"{url}/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": 16, "do_sample": False}},
        timeout=120,
    ).json()
    final = events[-1].generated_text or streamed
    # InferenceClient posts to `/`, where TGI's return_full_text defaults to true: the prompt comes first.
    res["stream_included_prompt"] = final.startswith(prompt)
    res["stream_text_equals_generate"] = final.removeprefix(prompt) == plain["generated_text"]
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "tgi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
        timeout=120,
    )
    res["chat_status"] = chat.status_code
    res["chat_usage"] = chat.json().get("usage")
    log(
        f"clients: /health {health.status_code}, /info {info.status_code}; InferenceClient streamed "
        f"{len(events)} events ({res['stream_finish_reason']}), equals /generate: "
        f"{res['stream_text_equals_generate']}; /v1/chat/completions {chat.status_code}"
    )
    return res


def _eq_body(i: int, max_new: int) -> dict[str, Any]:
    parameters: dict[str, Any] = {"max_new_tokens": max_new // 2 + 5 * (i % 4), "details": True}
    if i % 2:
        parameters.update(do_sample=True, seed=100 + i, temperature=1.5, top_k=50, top_p=0.95)
    return {"inputs": EQ_PROMPTS[i % len(EQ_PROMPTS)], "parameters": parameters}


def _tokens(url: str, body: dict[str, Any]) -> list[int]:
    response = httpx.post(f"{url}/generate", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def batching_equivalence(url: str, n: int, max_new: int) -> dict[str, Any]:
    """As tests/serving/test_batching.py: each request alone, then all at once; tokens must be equal."""
    bodies = [_eq_body(i, max_new) for i in range(n)]
    alone = [_tokens(url, b) for b in bodies]
    steps_before = metric(url, "tgi_batch_next_size_count")
    with ThreadPoolExecutor(max_workers=n) as pool:
        batched = list(pool.map(lambda b: _tokens(url, b), bodies))
    steps = metric(url, "tgi_batch_next_size_count") - steps_before
    rows = []
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        diverge = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if diverge is None and len(a) != len(b):
            diverge = min(len(a), len(b))
        rows.append(
            {
                "greedy": not i % 2,
                "tokens_alone": len(a),
                "tokens_batched": len(b),
                "equal": a == b,
                "first_divergence": diverge,
            }
        )
    res = {
        "requests": n,
        "all_equal": alone == batched,
        "greedy_equal": all(r["equal"] for r in rows if r["greedy"]),
        "seeded_sampling_equal": all(r["equal"] for r in rows if not r["greedy"]),
        "engine_steps_batched": steps,
        "tokens_batched": sum(len(t) for t in batched),
        "shared_steps": steps < sum(len(t) for t in batched),
        "rows": rows,
    }
    log(
        f"alone vs batched ({n} requests, half greedy, half seeded sampling): all equal {res['all_equal']} "
        f"(greedy {res['greedy_equal']}, seeded {res['seeded_sampling_equal']}); "
        f"{steps:.0f} engine steps for {res['tokens_batched']} tokens"
    )
    return res


def stream_runs(url: str, prompts: list[str], max_new: int, concurrency: int) -> dict[str, Any]:
    """bench/serving.py's streaming run, logged."""
    res: dict[str, Any] = _bench_serving().stream_runs(url, prompts, max_new, concurrency)
    log(
        f"server, {len(prompts)} requests x {max_new} tokens, concurrency {concurrency:2d}: "
        f"{res['tokens_per_s']:8.1f} tok/s ({res['seconds']:.1f} s); "
        f"TTFT p50 {res['ttft_p50_s'] * 1000:.1f} ms p99 {res['ttft_p99_s'] * 1000:.1f} ms; "
        f"ITL p50 {res['itl_p50_s'] * 1000:.1f} ms p99 {res['itl_p99_s'] * 1000:.1f} ms"
    )
    return res


def gpu_memory_by_pid() -> dict[str, str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {
        line.split(",")[0].strip(): line.split(",")[1].strip() for line in out.splitlines() if "," in line
    }


def full(a: argparse.Namespace) -> int:
    import torch
    import transformers

    bench_serving = _bench_serving()
    from llm_serving.loading import load, resolve

    t_start = time.perf_counter()
    out: Path = a.out
    max_new: int = a.max_new_tokens

    def left() -> float:
        return float(a.budget_s - (time.perf_counter() - t_start))

    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "transformers_file": transformers.__file__,
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "max_new_tokens": max_new,
    }

    def save() -> None:
        write_json(out / "results.json", results)

    results["model"] = build_model(a.model_dir, a.tokenizer, a)
    save()
    server = serve(a.model_dir, max_new, out / "server.log")
    proc, url = server.process, server.url
    results["server_start_seconds"] = server.seconds
    failures: list[str] = []
    try:
        try:
            results["clients"] = client_checks(url)
        except Exception as exc:
            failures.append(f"clients: {type(exc).__name__}: {exc}")
            log(failures[-1])
        save()
        try:
            results["batching_equivalence"] = eq = batching_equivalence(url, a.eq_requests, max_new)
            if not eq["all_equal"]:
                failures.append("alone != batched")
        except Exception as exc:
            failures.append(f"equivalence: {type(exc).__name__}: {exc}")
            log(failures[-1])
        save()

        prompts = [
            p + suffix
            for suffix in ("", " Then summarise it.", " Tell it in the first person.", " Give it a twist.")
            for p in bench_serving.PROMPTS
        ]
        # Warm-up: a burst that walks the batch sizes.
        stream_runs(url, prompts[: max(a.concurrency)], 4, max(a.concurrency))
        runs: dict[str, Any] = {}
        results["server_streaming"] = runs
        runs["sequential"] = stream_runs(url, prompts[: a.sequential_requests], max_new, 1)
        save()
        for c in a.concurrency:
            if left() < 30:
                log(f"skipping concurrency {c}: {left():.0f} s of budget left")
                continue
            runs[f"concurrent_{c}"] = stream_runs(url, prompts[:c], max_new, c)
            save()
        seq_tps = runs["sequential"]["tokens_per_s"]
        results["speedup_vs_sequential_server"] = {
            k: v["tokens_per_s"] / seq_tps for k, v in runs.items() if k != "sequential"
        }
        log(f"speed-up vs one-at-a-time: {results['speedup_vs_sequential_server']}")
        (out / "metrics.txt").write_text(httpx.get(f"{url}/metrics").text)
        results["gpu_memory_by_pid"] = gpu_memory_by_pid()
        results["server_pid"] = proc.pid
        save()

        if a.baselines and left() > 60:
            device = "cuda:0" if torch.cuda.is_available() else None
            model, tokenizer = load(resolve(str(a.model_dir)), "auto", device=device)
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            bench_serving.run_generate(model, tokenizer, prompts[:2], 4)  # warm-up
            seq_s, seq_n = 0.0, 0
            for p in prompts[: a.sequential_requests]:
                s, n = bench_serving.run_generate(model, tokenizer, [p], max_new)
                seq_s, seq_n = seq_s + s, seq_n + n
            static: dict[str, Any] = {}
            for c in a.concurrency:
                s, n = bench_serving.run_generate(model, tokenizer, prompts[:c], max_new)
                static[f"static_batch_{c}"] = {"seconds": s, "tokens": n, "tokens_per_s": n / s}
            results["model_generate"] = {
                "sequential": {"seconds": seq_s, "tokens": seq_n, "tokens_per_s": seq_n / seq_s},
                **static,
            }
            log(f"model.generate in-process: {results['model_generate']}")
            save()
            if left() > 60:
                gap = seq_s / a.sequential_requests / 4
                results["mixed_arrivals"] = mixed = bench_serving.mixed_arrivals(
                    url, model, tokenizer, prompts[:8], max_new, gap=gap
                )
                log(f"mixed arrivals: {mixed}")
            del model
        elif a.baselines:
            log(f"skipping model.generate baselines: {left():.0f} s of budget left")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        results["server_exit_code"] = proc.returncode
        results["failures"] = failures
        results["total_seconds"] = time.perf_counter() - t_start
        save()
    log(f"done in {results['total_seconds']:.0f} s; failures: {failures or 'none'}")
    return 1 if failures else 0


def _step_ms(model: Any, batch: int, padded: bool, steps: int) -> float:
    """Median wall time of one engine decode step (ModelRunner.execute, logits copied to the CPU)."""
    import torch

    from llm_serving.engine.runner import RowPlan, StepPlan

    rng = random.Random(batch)
    lens = [rng.randrange(20, 60) if padded else 40 for _ in range(batch)]
    prompts = tuple(tuple(rng.randrange(100, 40000) for _ in range(n)) for n in lens)
    runner, tables = _paged_runner(model, batch, max(lens) + 1)
    runner.execute(StepPlan(rows=tuple(RowPlan(p, 0, t, True) for p, t in zip(prompts, tables, strict=True))))
    plan = _decode_plan(tables, lens)
    times = []
    for _ in range(steps + 2):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        runner.execute(plan)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times[2:])[len(times[2:]) // 2]


def diag(a: argparse.Namespace) -> int:
    """Where a decode step's time goes (batch size, left padding, attention kernel), and whether a
    float32 server gives equal tokens alone and batched."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from llm_serving.engine.runner import RowPlan, StepPlan
    from llm_serving.loading import load, resolve

    out: Path = a.out
    results: dict[str, Any] = {"steps": {}}
    if not (a.model_dir / "config.json").is_file():
        results["model"] = build_model(a.model_dir, a.tokenizer, a)
    device = "cuda:0" if torch.cuda.is_available() else None
    model, _ = load(resolve(str(a.model_dir)), "auto", device=device)
    results["dtype"] = str(next(model.parameters()).dtype)
    results["attn_implementation"] = model.config._attn_implementation
    # sdpa-no-cudnn: SDPA with PyTorch's cuDNN attention backend switched off (flash / memory-efficient
    # kernels instead). On the H100 with torch 2.11 the cuDNN backend cost ~30-55 ms per decode step at
    # (batch, length) shapes it had not seen, against ~13 ms for eager attention.
    # The runner attends through its own `llm_paged` attention whatever is set here (its SDPA fallback
    # follows the cuDNN switch); the model's own implementation only matters to `generate`.
    for attn in ("sdpa", "sdpa-no-cudnn", "eager"):
        try:
            model.set_attn_implementation(attn.removesuffix("-no-cudnn"))
            if device:
                torch.backends.cuda.enable_cudnn_sdp(attn != "sdpa-no-cudnn")
        except Exception as exc:
            results["steps"][attn] = f"{type(exc).__name__}: {exc}"
            continue
        for batch in a.concurrency:
            for padded in (False, True):
                ms = _step_ms(model, batch, padded, a.diag_steps)
                key = f"{attn} batch {batch} {'padded' if padded else 'same length'}"
                results["steps"][key] = ms
                log(f"decode step, {key}: {ms:.2f} ms")
        write_json(out / "diag.json", results)
    model.set_attn_implementation(results["attn_implementation"])
    if device:
        torch.backends.cuda.enable_cudnn_sdp(True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device else [])
    batch = max(a.concurrency)
    lens = [20 + (i * 7) % 40 for i in range(batch)]
    runner, tables = _paged_runner(model, batch, max(lens) + 1)
    prompts = tuple(tuple(range(100, 100 + n)) for n in lens)
    runner.execute(StepPlan(rows=tuple(RowPlan(p, 0, t, True) for p, t in zip(prompts, tables, strict=True))))
    plan = _decode_plan(tables, lens)
    runner.execute(plan)
    with profile(activities=activities) as prof:
        for _ in range(3):
            runner.execute(plan)
    sort = "self_cuda_time_total" if device else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=20)
    table_cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=20)
    (out / "profile.txt").write_text(f"3 decode steps, batch {batch}, padded\n\n{table}\n\n{table_cpu}\n")
    print(table, flush=True)
    del model, runner
    if device:
        torch.cuda.empty_cache()
    if a.eq_dtypes:
        for dtype in a.eq_dtypes.split(","):
            server = serve(a.model_dir, a.max_new_tokens, out / f"server-{dtype}.log", dtype)
            proc = server.process
            try:
                eq = batching_equivalence(server.url, a.eq_requests, a.max_new_tokens)
                results[f"batching_equivalence_{dtype}"] = eq
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            write_json(out / "diag.json", results)
    write_json(out / "diag.json", results)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["probe", "full", "diag"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tag", default="local", help="probe: name of the transformers under test")
    p.add_argument("--tokenizer", type=Path, default=ROOT / ".cache/serving-tests/tokenizer-smollm2-0.1.2")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/gpu-check-model"))
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--init-range", type=float, default=0.2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--eq-requests", type=int, default=12)
    p.add_argument("--sequential-requests", type=int, default=8)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64])
    p.add_argument("--diag-steps", type=int, default=10)
    p.add_argument("--eq-dtypes", default="float32", help="diag: server dtypes for the alone/batched check")
    p.add_argument("--no-baselines", dest="baselines", action="store_false")
    p.add_argument("--budget-s", type=float, default=240, help="skip optional parts past this")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.stage == "probe":
        return probe(a.out, a.tag)
    if a.stage == "diag":
        return diag(a)
    return full(a)


if __name__ == "__main__":
    sys.exit(main())
