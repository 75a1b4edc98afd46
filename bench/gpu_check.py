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
import statistics
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


# ----------------------------------------------------------------------------------------------- decode

LLAMA3_8B = "4096,32,32,8,14336,128256"
"""hidden, layers, heads, KV heads, intermediate, vocab of Llama-3-8B."""
MODEL_289M = "1024,16,16,8,2816,49152"
"""The earlier runs' random Llama (SmolLM2's vocabulary): 289M parameters."""
NO_CUDA = "skipped: no CUDA"
GOALS = {
    "large_batch1_roofline_fraction": 0.70,
    "server_64_streams_tokens_per_s": 4000.0,
    "small_batch1_step_ms": 1.5,
}


def llama_config(shape: str, init_range: float, tokenizer: Any) -> Any:
    """A LlamaConfig of `shape` ("hidden,layers,heads,kv_heads,intermediate,vocab"; vocab 0: the
    tokenizer's) with the tokenizer's special tokens."""
    from transformers import LlamaConfig

    hidden, layers, heads, kv_heads, intermediate, vocab = (int(x) for x in shape.split(","))
    return LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=init_range,
        tie_word_embeddings=False,
    )


def init_model(config: Any, dtype: Any, device: str) -> Any:
    """Random weights made on `device` itself (no CPU copy, no download): the model on the meta device, its
    storage allocated there, weights drawn in place, norms at 1, the rotary buffers recomputed."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config.dtype = dtype
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range, generator=generator)
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(device)
    return model.eval()


def weight_bytes(model: Any) -> int:
    """Bytes a decode step reads: every weight but the input embedding (a step gathers only its rows)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


def copy_bandwidth(gib: float = 4.0, repeats: int = 20) -> dict[str, Any] | str:
    """Device-to-device copy bandwidth, counting the bytes read and written."""
    import torch

    if not torch.cuda.is_available():
        return NO_CUDA
    src = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    moved = 2 * src.numel() * src.element_size() * repeats
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes_per_copy": moved // repeats, "seconds": seconds, "bytes_per_s": moved / seconds}


def decode_steps(
    model: Any, batches: list[int], context: int, steps: int, graphs: bool
) -> dict[str, Any] | str:
    """Median decode step (ModelRunner.execute + greedy device sampling + the chosen ids to the host) at
    each batch size, every row at position `context`, with the decode graphs (captured for the largest
    batch's buckets) or eagerly."""
    import torch

    from llm_serving.engine import attention
    from llm_serving.engine.graphs import DecodeGraphs
    from llm_serving.engine.kv_cache import PagedKVCache, default_block_size
    from llm_serving.engine.runner import ModelRunner, RowPlan, StepPlan
    from llm_serving.sampling.device import DeviceSampler
    from llm_serving.sampling.params import SamplingParams

    cuda = torch.cuda.is_available()
    if graphs and not cuda:
        return NO_CUDA
    device = next(model.parameters()).device
    block = default_block_size(device)
    per = -(-(context + 1) // block)
    rows = max(batches)
    cache = PagedKVCache(model, rows * per + 1, block)
    tables = [tuple(range(r * per, (r + 1) * per)) for r in range(rows)]
    decode = None
    if graphs:
        decode = DecodeGraphs(
            model,
            cache,
            max_batch=rows,
            width=per,
            scratch=rows * per,
            cuda_kernel=attention.cuda_kernel_applies(cache),
            capture=True,
        )
    runner = ModelRunner(model, cache, graphs=decode, device_logits=True)
    result: dict[str, Any] = {"context": context, "kernel": attention.kernel_for(cache).value}
    if decode is not None:
        result["captured"] = runner.capture()
        result["capture_seconds"] = decode.capture_seconds
    sampler = DeviceSampler(rows, int(model.config.vocab_size), device)
    for slot in range(rows):
        sampler.admit(slot, SamplingParams(), ())
    step_ms: dict[str, float] = {}
    for batch in batches:
        plan = StepPlan(rows=tuple(RowPlan((5,), context, tables[r], True) for r in range(batch)))
        times = []
        for _ in range(steps + 3):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            logits = runner.execute(plan).logits
            sampler.sample(logits, list(range(batch)))
            times.append((time.perf_counter() - start) * 1000)
        step_ms[str(batch)] = sorted(times[3:])[len(times[3:]) // 2]
    result["step_ms"] = step_ms
    del runner, decode, cache, sampler
    if cuda:
        torch.cuda.empty_cache()
    return result


def engine_run(model: Any, tokenizer: Any, prompts: list[list[int]], max_new: int) -> dict[str, Any]:
    """The whole engine in-process (scheduling, graphs, device sampling, detokenizing): every prompt at
    once, `max_new` tokens each; throughput, decode step time and the GPU's idle gap between decode steps."""
    import torch

    from llm_serving.engine.factory import EngineConfig, build_engine
    from llm_serving.engine.request import Request
    from llm_serving.sampling.params import SamplingParams, StoppingParams

    longest = max(map(len, prompts)) + max_new
    config = EngineConfig(
        max_batch_size=len(prompts),
        max_batch_total_tokens=len(prompts) * (longest + 512),
        max_total_tokens=longest,
    )
    built = time.perf_counter()
    engine = build_engine(model, tokenizer, [], config)
    runner = engine.runner
    result: dict[str, Any] = {
        "requests": len(prompts),
        "max_new_tokens": max_new,
        "build_seconds": time.perf_counter() - built,
        "graphs": None if runner.graphs is None else runner.graphs.captured,
        "capture_seconds": None if runner.graphs is None else runner.graphs.capture_seconds,
        "device_sampler": runner.device_logits,
    }
    stopping = StoppingParams(max_new_tokens=max_new, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(Request(i, tuple(p), SamplingParams(), stopping, arrival=time.monotonic()))
    decode_ms: list[float] = []
    tokens = 0
    start = time.perf_counter()
    decoding = False
    while engine.has_work:
        before = time.perf_counter()
        events, stats = engine.step()
        tokens += len(events)
        if stats is not None and stats.rows and not stats.prefill_rows:
            if not decoding and runner.gaps is not None:
                runner.gaps.reset()  # gaps between decode steps only
            decoding = True
            decode_ms.append((time.perf_counter() - before) * 1000)
    seconds = time.perf_counter() - start
    result.update(
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds,
        decode_step_ms_p50=_bench_serving().percentile(decode_ms, 50),
    )
    if runner.gaps is not None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        gaps = list(runner.gaps.gaps_ms)
        result["gpu_gap_ms"] = {
            "steps": len(gaps),
            "p50": _bench_serving().percentile(gaps, 50),
            "p90": _bench_serving().percentile(gaps, 90),
            "max": max(gaps, default=float("nan")),
        }
    else:
        result["gpu_gap_ms"] = NO_CUDA
    del engine, runner
    return result


def peer_generate_batch(model: Any, prompts: list[list[int]], max_new: int) -> dict[str, Any]:
    """transformers' continuous batching (`generate_batch`) on the same prompts, greedy, EOS ignored (the
    whole call, as its caller pays it; after a small warm-up call)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1)  # type: ignore[no-untyped-call]
    warm = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1)  # type: ignore[no-untyped-call]
    model.generate_batch(prompts[:2], generation_config=warm)
    start = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=config)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {"requests": len(prompts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def distinct_prompts(tokenizer: Any, count: int, length: int, seed: int) -> list[str]:
    """`count` texts of about `length` tokens each, with no common prefix (no prefix-cache hits)."""
    rng = random.Random(seed)
    vocab = min(len(tokenizer), 40000)
    return [tokenizer.decode([rng.randrange(1000, vocab) for _ in range(length)]) for _ in range(count)]


def server_arms(
    model_dir: Path, tokenizer: Any, prompts: list[str], a: argparse.Namespace, log_path: Path
) -> dict[str, Any]:
    """The real server over `model_dir`: `len(prompts)` concurrent streams of `max_new_tokens`, then TTFT at
    `ttft_requests` concurrent prompts of `ttft_tokens` tokens; with its start-up time and graph capture."""
    bench_serving = _bench_serving()
    long_prompts = distinct_prompts(tokenizer, a.ttft_requests, a.ttft_tokens, seed=16)
    lengths = [len(tokenizer(p).input_ids) for p in long_prompts]
    server = bench_serving.start_server(
        str(model_dir),
        a.max_new_tokens,
        max_batch_size=len(prompts),
        log_path=log_path,
        timeout=300,
        max_input_tokens=max(lengths) + 16,
    )
    result: dict[str, Any] = {"start_seconds": server.seconds}
    try:
        result["graph_capture_seconds"] = metric(server.url, "llm_serving_cuda_graph_capture_seconds")
        bench_serving.stream_runs(server.url, prompts, 4, len(prompts))  # warm-up burst
        result["streams"] = stream_runs(server.url, prompts, a.max_new_tokens, len(prompts))
        ttft = bench_serving.stream_runs(server.url, long_prompts, 16, len(long_prompts))
        result["ttft"] = {**ttft, "prompt_tokens_mean": statistics.mean(lengths)}
        log(f"server: TTFT p50 {ttft['ttft_p50_s'] * 1000:.1f} ms at {len(long_prompts)} concurrent prompts")
    finally:
        server.process.terminate()
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()
    return result


def greedy_equality(
    model: Any, tokenizer: Any, model_dir: Path, dtype: str, tokens: int, log_path: Path
) -> dict[str, Any]:
    """The server's greedy tokens (each prompt alone, then all at once) vs in-process `model.generate`,
    `tokens` each, EOS ignored on both sides; the first diverging position per prompt."""
    import torch

    reference = []
    with torch.inference_mode():
        for prompt in EQ_PROMPTS:
            ids = torch.tensor([tokenizer(prompt).input_ids], device=next(model.parameters()).device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )
            reference.append(out[0, ids.shape[1] :].tolist())
    server = _bench_serving().start_server(
        str(model_dir), tokens, dtype=dtype, log_path=log_path, timeout=300
    )
    bodies = [
        {"inputs": p, "parameters": {"max_new_tokens": tokens, "do_sample": False, "details": True}}
        for p in EQ_PROMPTS
    ]
    try:
        alone = [_tokens(server.url, b) for b in bodies]
        with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
            batched = list(pool.map(lambda b: _tokens(server.url, b), bodies))
    finally:
        server.process.terminate()
        server.process.wait(timeout=60)

    def divergence(a: list[int], b: list[int]) -> int | None:
        return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)

    # A server row may stop early at EOS (the random model can emit it); compare the common length.
    return {
        "dtype": dtype,
        "tokens": tokens,
        "alone_equal": all(divergence(s, r) is None for s, r in zip(alone, reference, strict=True)),
        "batched_equal": all(divergence(s, r) is None for s, r in zip(batched, reference, strict=True)),
        "alone_first_divergence": [divergence(s, r) for s, r in zip(alone, reference, strict=True)],
        "batched_first_divergence": [divergence(s, r) for s, r in zip(batched, reference, strict=True)],
        "server_lengths": [len(s) for s in batched],
    }


class DecodeCheck:
    """Issue 16's one-shot GPU run: every arm records its result (or its failure) in <out>/gpu_decode.json."""

    def __init__(self, a: argparse.Namespace) -> None:
        import torch
        import transformers
        from transformers import AutoTokenizer

        self.a = a
        self.started = time.perf_counter()
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.results: dict[str, Any] = {
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "gpu": torch.cuda.get_device_name(0) if self.cuda else None,
            },
            "goals": GOALS,
        }
        self.failures: list[str] = []
        self.tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
        suffixes = ("", " Then summarise it.", " Tell it in the first person.", " Give it a twist.")
        self.texts = [p + s for s in suffixes for p in _bench_serving().PROMPTS][: a.streams]
        self.ids = [self.tokenizer(t).input_ids for t in self.texts]
        self.bandwidth: Any = None

    def save(self) -> None:
        self.results["seconds"] = time.perf_counter() - self.started
        write_json(self.a.out / "gpu_decode.json", self.results)

    def arm(self, name: str, run: Any) -> Any:
        """Run one measurement; a failure is recorded and the run goes on."""
        try:
            value = run()
        except Exception as exc:
            value = f"failed: {type(exc).__name__}: {exc}"
            self.failures.append(f"{name}: {value}")
            log(f"{name}: {value}")
        self.results[name] = value
        self.save()
        return value

    def left(self) -> float:
        return float(self.a.budget_s - (time.perf_counter() - self.started))

    def free(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def floor_ms(self, nbytes: int) -> float | None:
        if isinstance(self.bandwidth, dict):
            return float(nbytes / self.bandwidth["bytes_per_s"] * 1000)
        return None

    def describe(self, name: str, model: Any, shape: str) -> dict[str, Any]:
        nbytes = weight_bytes(model)
        info = {
            "shape": shape,
            "dtype": str(next(model.parameters()).dtype),
            "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": nbytes,
            "hbm_floor_ms": self.floor_ms(nbytes),
        }
        self.results[name] = info
        self.save()
        log(f"{name}: {info['parameters'] / 1e9:.3f}B parameters, {nbytes / 1e9:.2f} GB read per step")
        return info

    def large_arms(self) -> Path:
        """The Llama-3-8B-shaped model: step times (graphs, eager), the engine in-process, the peer; saved
        for the server. Returns its directory."""
        a, tokenizer = self.a, self.tokenizer
        model = init_model(llama_config(a.large, 0.02, tokenizer), self.dtype, self.device)
        info = self.describe("large", model, a.large)
        graphs = self.arm(
            "large_decode_graphs", lambda: decode_steps(model, a.batches, a.context, a.steps, True)
        )
        self.free()
        self.arm("large_decode_eager", lambda: decode_steps(model, a.batches, a.context, a.steps, False))
        self.free()
        if isinstance(graphs, dict) and info["hbm_floor_ms"] is not None:
            info["batch1_roofline_fraction"] = info["hbm_floor_ms"] / graphs["step_ms"]["1"]
        self.arm("large_engine", lambda: engine_run(model, tokenizer, self.ids, a.max_new_tokens))
        self.free()
        directory = a.model_dir / "large"
        saved = time.perf_counter()
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        info["save_seconds"] = time.perf_counter() - saved
        if self.left() > 120:
            self.arm("peer_generate_batch", lambda: peer_generate_batch(model, self.ids, a.max_new_tokens))
        else:
            self.results["peer_generate_batch"] = f"skipped: {self.left():.0f} s of budget left"
        self.save()
        return directory

    def small_arms(self) -> None:
        """The 289M model: float32 greedy equality through the server, its step times, bf16 divergence."""
        import torch

        a, tokenizer, out = self.a, self.tokenizer, self.a.out
        model = init_model(llama_config(a.small, 0.2, tokenizer), torch.float32, self.device)
        directory = a.model_dir / "small-float32"
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        self.arm(
            "equality_float32",
            lambda: greedy_equality(
                model, tokenizer, directory, "float32", a.eq_tokens, out / "server-f32.log"
            ),
        )
        model = model.to(self.dtype)
        self.describe("small", model, a.small)
        self.arm("small_decode_graphs", lambda: decode_steps(model, [1, 8, 64], a.context, a.steps, True))
        self.free()
        self.arm("small_decode_eager", lambda: decode_steps(model, [1], a.context, a.steps, False))
        if not self.cuda:
            self.results["equality_bfloat16"] = NO_CUDA
        elif self.left() < 60:
            self.results["equality_bfloat16"] = f"skipped: {self.left():.0f} s of budget left"
        else:
            bf16 = a.model_dir / "small-bfloat16"
            model.save_pretrained(bf16)
            tokenizer.save_pretrained(bf16)
            self.arm(
                "equality_bfloat16",
                lambda: greedy_equality(
                    model, tokenizer, bf16, "bfloat16", a.eq_tokens, out / "server-bf16.log"
                ),
            )

    def run(self) -> int:
        self.bandwidth = self.arm("copy_bandwidth", copy_bandwidth)
        large = self.large_arms()
        self.free()
        self.arm(
            "server",
            lambda: server_arms(large, self.tokenizer, self.texts, self.a, self.a.out / "server.log"),
        )
        self.small_arms()
        self.free()
        self.results["failures"] = self.failures
        self.save()
        summary(self.results)
        log(f"done in {self.results['seconds']:.0f} s; failures: {self.failures or 'none'}")
        return 1 if self.failures else 0


def _ms(seconds: Any) -> Any:
    return seconds * 1000 if isinstance(seconds, float) else seconds


def summary(r: dict[str, Any]) -> None:
    """One line per point of the issue's "What it must show"."""

    def get(*path: str) -> Any:
        value: Any = r
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return value if isinstance(value, str) else None
            value = value[key]
        return value

    def ms(value: Any) -> str:
        return f"{value:.2f} ms" if isinstance(value, float) else str(value)

    def num(value: Any) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    bw = get("copy_bandwidth", "bytes_per_s")
    print("== summary (goals in brackets)")
    print(f"copy bandwidth: {bw / 1e12:.2f} TB/s" if isinstance(bw, float) else f"copy bandwidth: {bw}")
    print(f"large: {get('large', 'weight_bytes')} weight bytes, HBM floor {ms(get('large', 'hbm_floor_ms'))}")
    eager = get("large_decode_eager", "step_ms")
    for batch in eager if isinstance(eager, dict) else []:
        graphs = get("large_decode_graphs", "step_ms", batch)
        print(f"  decode step batch {batch:>3}: graphs {ms(graphs)}, eager {ms(eager[batch])}")
    fraction = get("large", "batch1_roofline_fraction")
    goal = GOALS["large_batch1_roofline_fraction"]
    print(f"  batch 1 at {fraction:.0%} of the roofline [>= {goal:.0%}]" if fraction else "  batch 1: -")
    engine_tps = num(get("large_engine", "tokens_per_s"))
    print(
        f"  engine in-process: {engine_tps} tok/s, GPU gap between decode steps (ms) "
        f"{get('large_engine', 'gpu_gap_ms')}"
    )
    streams = get("server", "streams", "tokens_per_s")
    peer = get("peer_generate_batch", "tokens_per_s")
    print(
        f"  server, {get('server', 'streams', 'requests')} streams: {num(streams)} tok/s "
        f"[>= {GOALS['server_64_streams_tokens_per_s']:.0f}]; generate_batch {num(peer)} tok/s; ratio "
        f"{streams / peer:.2f}"
        if isinstance(streams, float) and isinstance(peer, float)
        else f"  server: {get('server')}; generate_batch: {peer}"
    )
    prompt_tokens = num(get("server", "ttft", "prompt_tokens_mean"))
    ttft = ms(_ms(get("server", "ttft", "ttft_p50_s")))
    print(
        f"  TTFT p50 at {get('server', 'ttft', 'requests')} x {prompt_tokens} tokens: {ttft}; server start "
        f"{num(get('server', 'start_seconds'))} s, graph capture "
        f"{num(get('server', 'graph_capture_seconds'))} s"
    )
    print(
        f"small: batch 1 graphs {ms(get('small_decode_graphs', 'step_ms', '1'))}, eager "
        f"{ms(get('small_decode_eager', 'step_ms', '1'))} [<= {GOALS['small_batch1_step_ms']} ms]"
    )
    for key in ("equality_float32", "equality_bfloat16"):
        value = r.get(key)
        if not isinstance(value, dict):
            print(f"{key}: {value}")
            continue
        print(
            f"{key}: alone {value['alone_equal']}, batched {value['batched_equal']}, first divergence "
            f"{value['batched_first_divergence']}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["probe", "full", "diag", "decode"])
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
    p.add_argument(
        "--large", default=LLAMA3_8B, help="decode: hidden,layers,heads,kv_heads,intermediate,vocab"
    )
    p.add_argument(
        "--small", default=MODEL_289M, help="decode: the small model's shape (vocab 0: the tokenizer's)"
    )
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64, 128])
    p.add_argument("--context", type=int, default=512, help="decode: position of the timed decode rows")
    p.add_argument("--steps", type=int, default=20, help="decode: timed steps per batch size")
    p.add_argument("--streams", type=int, default=64, help="decode: concurrent streams through the server")
    p.add_argument("--ttft-requests", type=int, default=16)
    p.add_argument("--ttft-tokens", type=int, default=512)
    p.add_argument("--eq-tokens", type=int, default=32)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.stage == "probe":
        return probe(a.out, a.tag)
    if a.stage == "diag":
        return diag(a)
    if a.stage == "decode":
        return DecodeCheck(a).run()
    return full(a)


if __name__ == "__main__":
    sys.exit(main())
