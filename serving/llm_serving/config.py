"""Server limits and settings (TGI launcher defaults)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

COMPUTE_TYPE_ENV = "COMPUTE_TYPE"
"""Env of the serving container that sets TGI's `x-compute-type` header (as TGI reads it)."""


@dataclass(frozen=True)
class Limits:
    """Admission and validation limits; names follow TGI's launcher flags."""

    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_batch_total_tokens: int | None = None
    """KV cache capacity in tokens; None: computed from free memory once the model is loaded."""
    max_batch_prefill_tokens: int = 4096
    max_batch_size: int = 64
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    max_body_bytes: int = 2_000_000
    """Larger request bodies are refused with 413 before they are parsed."""
    validation_workers: int = 2
    """Threads that tokenize (and render chat templates) off the event loop; TGI's default."""

    def __post_init__(self) -> None:
        if not 0 < self.max_input_tokens < self.max_total_tokens:
            raise ValueError("max_input_tokens must be positive and smaller than max_total_tokens")
        if self.max_batch_total_tokens is not None:
            check_capacity(self, self.max_batch_total_tokens)
        if self.max_batch_prefill_tokens <= 0 or self.max_batch_size <= 0:
            raise ValueError("max_batch_prefill_tokens and max_batch_size must be positive")
        if self.max_body_bytes <= 0 or self.validation_workers <= 0:
            raise ValueError("max_body_bytes and validation_workers must be positive")


@dataclass(frozen=True)
class CacheOptions:
    """How the paged KV cache is laid out and used (TGI's and vLLM's flags)."""

    block_size: int | None = None
    """Tokens per KV block; None: the device's default."""
    prefix_caching: bool = True
    chunked_prefill: bool = True
    memory_fraction: float = 0.9
    """Share of the free device memory the KV cache may take when its size is computed."""

    def __post_init__(self) -> None:
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")


def check_capacity(limits: Limits, capacity: int) -> None:
    """Every valid request must fit the KV cache on its own; raises ValueError otherwise."""
    if limits.max_total_tokens > capacity:
        raise ValueError(
            f"max_total_tokens ({limits.max_total_tokens}) must be <= max_batch_total_tokens ({capacity}): "
            "the KV cache cannot hold one request of maximal length; give more memory "
            "(--kv-cache-memory-fraction, --max-batch-total-tokens) or lower --max-total-tokens"
        )


@dataclass(frozen=True)
class DistSettings:
    work_timeout: timedelta = timedelta(seconds=120)
    """Bound on a collective while work is in flight: the longest a step may take on one rank beyond the
    others (a first step's warm-up included)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def launch_ranks() -> Ranks:
    """The ranks torchrun set in the environment; read before torch is imported."""
    env = os.environ.get
    return Ranks(int(env("RANK", "0")), int(env("WORLD_SIZE", "1")), int(env("LOCAL_RANK", "0")))
