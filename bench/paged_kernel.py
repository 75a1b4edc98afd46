"""The paged decode attention kernels on a GPU, on Llama-3-8B attention shapes (32 query heads, 8 KV heads,
head dim 128, bf16, pages of 256 tokens): our Triton kernel (default splits and one split), torch's paged
varlen flash attention (where the installed torch has it) and today's SDPA path (pages gathered, masked
SDPA).

  PYTHONPATH=serving python3 -m bench.paged_kernel --out /tmp/gpu-check      (about a minute on an H200)

Per (batch, context): median ms per call (CUDA events), the KV bytes read per second, the largest difference
from float32 SDPA; plus the kernel choice for this torch, Triton's first-call (compile) time and a float32
check. Without CUDA it writes `{"skipped": "no CUDA"}`. Results: <out>/gpu_paged_kernel.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, DIM, PAGE = 32, 8, 128, 256
BATCHES = (1, 8, 32, 64, 128)
CONTEXTS = (512, 2048, 8192)


def _median_ms(call: Callable[[], object], iters: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _inputs(batch: int, context: int, dtype: torch.dtype) -> dict[str, Any]:
    """A cache of shuffled pages; rows of ragged lengths up to `context`."""
    width = -(-context // PAGE)
    keys = torch.randn(batch * width + 1, PAGE, KV_HEADS, DIM, device="cuda", dtype=dtype)
    values = torch.randn_like(keys)
    table = torch.randperm(batch * width, device="cuda").view(batch, width).int()
    lengths = torch.tensor([context - (i * 37) % (context // 2) for i in range(batch)], device="cuda")
    query = torch.randn(batch, HEADS, DIM, device="cuda", dtype=dtype)
    varlen = {  # what the runner builds once per step for torch's varlen kernel
        "cu_seq_q": torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
        "cu_seq_k": F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)),
        "seqused_k": lengths.int(),
        "max_k": int(lengths.max()),
    }
    return {
        "query": query,
        "keys": keys,
        "values": values,
        "table": table,
        "lengths": lengths,
        "varlen": varlen,
    }


def _sdpa(x: dict[str, Any], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Today's decode path: the rows' pages gathered into `[B, Hkv, W * PAGE, D]`, SDPA with a length mask."""
    batch, width = x["table"].shape
    blocks = x["table"].flatten().long()
    k = x["keys"].index_select(0, blocks).view(batch, width * PAGE, KV_HEADS, DIM).transpose(1, 2)
    v = x["values"].index_select(0, blocks).view(batch, width * PAGE, KV_HEADS, DIM).transpose(1, 2)
    q = x["query"].unsqueeze(2)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = torch.arange(width * PAGE, device="cuda")[None, :] < x["lengths"][:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
    return out.squeeze(2)


def _varlen(x: dict[str, Any]) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    meta = x["varlen"]
    out = varlen_attn(
        x["query"],
        x["keys"],
        x["values"],
        meta["cu_seq_q"],
        meta["cu_seq_k"],
        1,
        meta["max_k"],
        enable_gqa=True,
        seqused_k=meta["seqused_k"],
        block_table=x["table"],
    )
    assert isinstance(out, torch.Tensor)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-check"))
    parser.add_argument("--iters", type=int, default=20)
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "gpu_paged_kernel.json"
    if not torch.cuda.is_available():
        path.write_text(json.dumps({"skipped": "no CUDA"}) + "\n")
        print("paged kernel: skipped: no CUDA")
        return
    import triton

    from llm_serving.engine.kernels.paged_decode import paged_decode
    from llm_serving.engine.kernels.select import choose, detect

    torch.backends.cuda.enable_cudnn_sdp(False)  # as the server runs (llm_serving.loading.load)
    device = torch.device("cuda", torch.cuda.current_device())
    features = detect(device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "features": {"paged_varlen": features.paged_varlen, "triton": features.triton},
        "choice": {
            f"{dtype} pages of {page}": choose("cuda", dtype, page, features).value
            for dtype in (torch.bfloat16, torch.float32)
            for page in (16, PAGE)
        },
        "runs": [],
    }
    torch.manual_seed(0)
    small = _inputs(2, 700, torch.float32)  # float32: the greedy-equality check's dtype
    begin = time.perf_counter()
    got = paged_decode(small["query"], small["keys"], small["values"], small["table"], small["lengths"])
    torch.cuda.synchronize()
    results["float32"] = {
        "first_call_s": round(time.perf_counter() - begin, 3),
        "max_abs_diff_vs_sdpa": (got - _sdpa(small)).abs().max().item(),
    }
    for context in CONTEXTS:
        for batch in BATCHES:
            x = _inputs(batch, context, torch.bfloat16)
            kv_bytes = int(x["lengths"].sum()) * KV_HEADS * DIM * 2 * 2
            reference = _sdpa(x, torch.float32)
            arms: dict[str, Callable[[], torch.Tensor]] = {
                "triton": lambda x=x: paged_decode(
                    x["query"], x["keys"], x["values"], x["table"], x["lengths"]
                ),
                "triton_one_split": lambda x=x: paged_decode(
                    x["query"], x["keys"], x["values"], x["table"], x["lengths"], num_splits=1
                ),
                "sdpa_gathered": lambda x=x: _sdpa(x),
            }
            if features.paged_varlen:
                arms["torch_varlen"] = lambda x=x: _varlen(x)
            run: dict[str, Any] = {"batch": batch, "context": context}
            for name, call in arms.items():
                try:
                    begin = time.perf_counter()
                    error = (call().float() - reference).abs().max().item()
                    first = time.perf_counter() - begin
                    ms = _median_ms(call, a.iters)
                except Exception as exc:  # one failing arm must not hide the others' numbers
                    run[name] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                run[name] = {
                    "ms": round(ms, 4),
                    "kv_gb_per_s": round(kv_bytes / ms / 1e6, 1),
                    "max_abs_diff_vs_fp32": error,
                    "first_call_s": round(first, 3),
                }
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            del x, reference
            torch.cuda.empty_cache()
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"paged kernel: {path}")


if __name__ == "__main__":
    main()
