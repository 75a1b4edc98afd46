"""What the loader runs, after the HTTP port is up (this module imports torch and transformers): join the
tensor-parallel group, load the model, size the KV cache, build the engine and the service; ranks other than
0 load and then follow rank 0's step plans."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from llm_serving.adapters import adapter_folder, check_tensor_parallel
from llm_serving.config import CacheOptions, Limits, check_capacity
from llm_serving.distributed import (
    DistContext,
    agree_num_blocks,
    all_ranks,
    follow_plans,
    init_distributed,
    plan_broadcaster,
)
from llm_serving.engine.async_engine import AsyncEngine
from llm_serving.engine.factory import (
    EngineConfig,
    build_engine,
    build_kv_cache,
    build_runner,
    usable_blocks,
)
from llm_serving.engine.kv_cache import PagedKVCache
from llm_serving.loading import eos_ids, load
from llm_serving.metrics import Metrics
from llm_serving.progress import Progress
from llm_serving.server import ServerOptions
from llm_serving.service import GenerationService
from llm_serving.source import check_local

log = logging.getLogger("llm_serving")


def device_for(ctx: DistContext) -> str | None:
    """This rank's GPU, or None (CPU)."""
    return f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else None


def compute_type() -> str:
    """TGI's `x-compute-type` default for this machine (env `COMPUTE_TYPE` overrides it)."""
    return "gpu+optimized" if torch.cuda.is_available() else "cpu+optimized"


def engine_config(limits: Limits, cache: CacheOptions) -> EngineConfig:
    return EngineConfig(
        max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
        max_batch_size=limits.max_batch_size,
        max_batch_total_tokens=limits.max_batch_total_tokens,
        block_size=cache.block_size,
        prefix_caching=cache.prefix_caching,
        chunked_prefill=cache.chunked_prefill,
        kv_cache_memory_fraction=cache.memory_fraction,
        max_total_tokens=limits.max_total_tokens,
    )


def sized_kv_cache(model: Any, limits: Limits, cache: CacheOptions, ctx: DistContext) -> PagedKVCache:
    """This rank's KV cache, the same number of blocks on every rank; ValueError (a clear refusal to start)
    when it cannot hold one request of `max_total_tokens`."""
    config = engine_config(limits, cache)
    kv = build_kv_cache(model, config, lambda n: agree_num_blocks(ctx, n))
    blocks = usable_blocks(kv, config)
    check_capacity(limits, blocks * kv.block_size)
    log.info(
        "rank %d: KV cache of %d blocks x %d tokens = %d tokens",
        ctx.rank,
        blocks,
        kv.block_size,
        blocks * kv.block_size,
    )
    return kv


def build_service(
    model: Any,
    tokenizer: Any,
    limits: Limits,
    metrics: Metrics,
    ctx: DistContext,
    cache: CacheOptions | None = None,
    adapters: tuple[tuple[str, Path], ...] = (),
    progress: Progress | None = None,
) -> GenerationService:
    """Engine thread + service around an already loaded model (rank 0), with the LoRA `adapters` (name, peft
    folder) installed; the service's limits carry the KV cache's real capacity. The decode graphs' capture
    time (part of the start-up, in `WarmingUp`) goes to the metrics and to `progress`'s message."""
    cache = cache or CacheOptions()
    kv = sized_kv_cache(model, limits, cache, ctx)
    engine = build_engine(
        model,
        tokenizer,
        eos_ids(model, tokenizer),
        replace(engine_config(limits, cache), adapters=adapters),
        broadcast=plan_broadcaster(ctx),
        cache=kv,
        agree=lambda ok: all_ranks(ctx, ok),
    )
    names = tuple(name for name, _ in adapters)
    graphs = engine.runner.graphs
    capture = graphs.capture_seconds if graphs is not None else 0.0
    metrics.set_graph_capture(capture)
    if progress is not None and graphs is not None:
        state = "captured" if graphs.captured else "not captured (eager decode)"
        progress.phase("WarmingUp", message=f"decode CUDA graphs {state} in {capture:.2f} s")
    metrics.set_cache_config(kv.block_size, engine.scheduler.pool.num_blocks)
    metrics.set_adapters(names)
    async_engine = AsyncEngine(engine, limits.max_concurrent_requests, on_step=metrics.on_step)
    effective = replace(limits, max_batch_total_tokens=engine.max_batch_total_tokens)
    return GenerationService(async_engine, tokenizer, effective, metrics, adapters=names)


def load_service(options: ServerOptions, progress: Progress, metrics: Metrics) -> GenerationService:
    """Rank 0: load the model (the loader reports its phases to `progress`), then build the engine in
    `WarmingUp`; the caller marks `Ready` when it serves."""
    check_local(options.source)
    ctx = init_distributed(options.dist)
    check_tensor_parallel(ctx.world_size, options.adapters)
    model, tokenizer = load(options.source, options.dtype, ctx.world_size, device_for(ctx), progress=progress)
    adapters = tuple((a.name, adapter_folder(a)) for a in options.adapters)
    progress.phase("WarmingUp")
    service = build_service(
        model, tokenizer, options.limits, metrics, ctx, options.cache, adapters, progress=progress
    )
    progress.adapters(service.adapters)
    log.info("rank 0/%d: model loaded, tensor parallel %d", ctx.world_size, model.tp_size or 1)
    return service


def follow(options: ServerOptions) -> None:
    """A rank other than 0: load this rank's shard, then run rank 0's plans until it says stop."""
    check_local(options.source)
    ctx = init_distributed(options.dist)
    check_tensor_parallel(ctx.world_size, options.adapters)
    model, _ = load(options.source, options.dtype, ctx.world_size, device_for(ctx), progress=Progress())
    log.info("rank %d/%d: model loaded, tensor parallel %d", ctx.rank, ctx.world_size, model.tp_size or 1)
    kv = sized_kv_cache(model, options.limits, options.cache, ctx)
    config = engine_config(options.limits, options.cache)
    # Its logits stay on the device: rank 0 samples, a follower only keeps its KV cache in step.
    runner = build_runner(model, kv, config, agree=lambda ok: all_ranks(ctx, ok), device_logits=True)
    follow_plans(ctx, runner)
