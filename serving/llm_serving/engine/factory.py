"""Building an engine from a loaded model: the KV cache sized, the scheduler and the runner wired."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_serving.engine.blocks import BlockPool
from llm_serving.engine.engine import Engine
from llm_serving.engine.kv_cache import PagedKVCache, default_block_size, num_blocks_for
from llm_serving.engine.lora import install
from llm_serving.engine.runner import ModelRunner, StepPlan
from llm_serving.engine.scheduler import Scheduler, SchedulerConfig


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


def _same(num_blocks: int) -> int:
    return num_blocks


def build_kv_cache(model: Any, config: EngineConfig, agree: Callable[[int], int] = _same) -> PagedKVCache:
    """This rank's paged KV cache, sized from `config` (or free memory); `agree` settles the block count
    with the other tensor-parallel ranks (each one calls this, in the same order)."""
    block_size = config.block_size or default_block_size(next(model.parameters()).device)
    wanted = num_blocks_for(model, block_size, config.max_batch_total_tokens, config.kv_cache_memory_fraction)
    return PagedKVCache(model, agree(wanted), block_size)


def build_engine(
    model: Any,
    tokenizer: Any,
    eos_ids: Collection[int],
    config: EngineConfig = EngineConfig(),
    broadcast: Callable[[StepPlan | None], None] | None = None,
    cache: PagedKVCache | None = None,
) -> Engine:
    """An engine over `model` (rank 0 of a tensor-parallel group when `broadcast` is given), with `cache`
    or one sized by `build_kv_cache`, and the LoRA adapters of `config` hooked into the model (AdapterError
    naming one that does not fit)."""
    if cache is None:
        cache = build_kv_cache(model, config)
    pool = BlockPool(cache.num_blocks, cache.block_size, prefix_caching=config.prefix_caching)
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
    return Engine(ModelRunner(model, cache, broadcast=broadcast, lora=lora), tokenizer, scheduler, eos_ids)
