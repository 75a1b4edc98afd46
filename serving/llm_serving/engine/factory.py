"""Building an engine from a loaded model: the KV cache sized, the scheduler and the runner wired."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_serving.engine import attention
from llm_serving.engine.blocks import BlockPool
from llm_serving.engine.engine import Engine
from llm_serving.engine.graphs import DecodeGraphs
from llm_serving.engine.kv_cache import PagedKVCache, default_block_size, num_blocks_for
from llm_serving.engine.lora import LoraLayers, install
from llm_serving.engine.runner import ModelRunner, StepPlan
from llm_serving.engine.scheduler import Scheduler, SchedulerConfig
from llm_serving.sampling.device import DeviceSampler


@dataclass(frozen=True)
class EngineConfig:
    """What the engine is built with; names follow TGI's and vLLM's flags."""

    max_batch_prefill_tokens: int = 4096
    max_batch_size: int = 64
    max_batch_total_tokens: int | None = None
    """KV cache capacity in tokens; None: computed from free memory."""
    block_size: int | None = None
    """Tokens per KV block; None: the device's default."""
    prefix_caching: bool = True
    chunked_prefill: bool = True
    kv_cache_memory_fraction: float = 0.9
    adapters: tuple[tuple[str, Path], ...] = ()
    """LoRA adapters `(name, local peft folder)`, installed on the model when the engine is built."""
    max_total_tokens: int | None = None
    """The longest sequence (prompt + generated); sizes the CUDA graphs' block tables (None: the KV cache's
    capacity)."""
    cuda_graphs: bool = True
    """Capture the decode forward as CUDA graphs at start-up (CUDA, no LoRA adapters)."""
    device_sampling: bool = True
    """Sample on the GPU (`sampling.device`; CUDA only): only the chosen tokens reach the host."""


def uses_graphs(device: torch.device, config: EngineConfig) -> bool:
    """Whether decode steps run as CUDA graphs: on CUDA, unless switched off or LoRA adapters are installed
    (their per-token adapter grouping is not static)."""
    return config.cuda_graphs and not config.adapters and device.type == "cuda"


def _same(num_blocks: int) -> int:
    return num_blocks


def build_kv_cache(model: Any, config: EngineConfig, agree: Callable[[int], int] = _same) -> PagedKVCache:
    """This rank's paged KV cache, sized from `config` (or free memory), plus the CUDA graphs' scratch block
    when they apply (the last block: padded decode rows write there); `agree` settles the block count with
    the other tensor-parallel ranks (each one calls this, in the same order)."""
    device = next(model.parameters()).device
    block_size = config.block_size or default_block_size(device)
    wanted = num_blocks_for(model, block_size, config.max_batch_total_tokens, config.kv_cache_memory_fraction)
    return PagedKVCache(model, agree(wanted) + _scratch_blocks(device, config), block_size)


def _scratch_blocks(device: torch.device, config: EngineConfig) -> int:
    return 1 if uses_graphs(device, config) else 0


def usable_blocks(cache: PagedKVCache, config: EngineConfig) -> int:
    """The blocks requests may use: all but the graphs' scratch block."""
    return cache.num_blocks - _scratch_blocks(cache.keys[0].device, config)


def build_runner(
    model: Any,
    cache: PagedKVCache,
    config: EngineConfig = EngineConfig(),
    broadcast: Callable[[StepPlan | None], None] | None = None,
    lora: LoraLayers | None = None,
    agree: Callable[[bool], bool] | None = None,
    device_logits: bool = False,
) -> ModelRunner:
    """This rank's runner over `cache` (from `build_kv_cache`), its decode graphs captured when they apply;
    `agree` settles the capture's outcome with the other tensor-parallel ranks (all use graphs, or none)."""
    graphs = None
    device = cache.keys[0].device
    if uses_graphs(device, config):
        capacity = usable_blocks(cache, config) * cache.block_size
        longest = min(config.max_total_tokens or capacity, capacity)
        graphs = DecodeGraphs(
            model,
            cache,
            max_batch=config.max_batch_size,
            width=-(-longest // cache.block_size),
            scratch=cache.num_blocks - 1,
            cuda_kernel=attention.cuda_kernel_applies(cache),
            capture=True,
        )
    runner = ModelRunner(
        model, cache, broadcast=broadcast, lora=lora, graphs=graphs, device_logits=device_logits
    )
    runner.capture(agree)
    return runner


def build_engine(
    model: Any,
    tokenizer: Any,
    eos_ids: Collection[int],
    config: EngineConfig = EngineConfig(),
    broadcast: Callable[[StepPlan | None], None] | None = None,
    cache: PagedKVCache | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> Engine:
    """An engine over `model` (rank 0 of a tensor-parallel group when `broadcast` is given), with `cache`
    or one sized by `build_kv_cache`, and the LoRA adapters of `config` hooked into the model (AdapterError
    naming one that does not fit); `agree` as in `build_runner`."""
    if cache is None:
        cache = build_kv_cache(model, config)
    pool = BlockPool(usable_blocks(cache, config), cache.block_size, prefix_caching=config.prefix_caching)
    scheduler = Scheduler(
        SchedulerConfig(
            max_batch_prefill_tokens=config.max_batch_prefill_tokens,
            max_batch_size=config.max_batch_size,
            chunked_prefill=config.chunked_prefill,
            prefix_caching=config.prefix_caching,
        ),
        pool,
    )
    lora = install(model, config.adapters) if config.adapters else None
    device = cache.keys[0].device
    sampler = None
    if config.device_sampling and device.type == "cuda":
        sampler = DeviceSampler(config.max_batch_size, vocab_size(model), device)
    runner = build_runner(
        model, cache, config, broadcast=broadcast, lora=lora, agree=agree, device_logits=sampler is not None
    )
    return Engine(runner, tokenizer, scheduler, eos_ids, sampler=sampler)


def vocab_size(model: Any) -> int:
    """Width of the model's logits."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)
