"""The paged KV cache: per-layer key and value tensors of fixed-size blocks, sized from the memory budget."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

CUDA_BLOCK_SIZE = 256
"""PyTorch's flash kernel takes a paged KV cache only in pages of a multiple of 256 tokens (flash_api.cpp:
"Paged KV cache block size must be divisible by 256")."""
CPU_BLOCK_SIZE = 16
CPU_MEMORY_SHARE = 0.25
CPU_MAX_BYTES = 2 * 1024**3
CPU_MAX_TOKENS = 65536


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_layout(model: Any) -> tuple[int, int, int]:
    """(layers, KV heads on this rank, head dim); a tensor-parallel model holds its share of the KV heads."""
    config = _text_config(model)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    tp_size = int(getattr(model, "tp_size", None) or 1)
    if kv_heads % tp_size:
        raise ValueError(f"{kv_heads} KV heads do not split over {tp_size} tensor-parallel ranks")
    return int(config.num_hidden_layers), kv_heads // tp_size, head_dim


def _model_tensor(model: Any) -> torch.Tensor:
    tensor: torch.Tensor = next(model.parameters())
    return tensor


def kv_bytes_per_token(model: Any) -> int:
    """Bytes one token's keys and values take on this rank, all layers together."""
    layers, kv_heads, head_dim = kv_layout(model)
    return 2 * layers * kv_heads * head_dim * _model_tensor(model).element_size()


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def num_blocks_for(
    model: Any, block_size: int, max_batch_total_tokens: int | None, memory_fraction: float
) -> int:
    """Blocks for `max_batch_total_tokens` tokens (rounded up), or, when None, from free memory:

    - CUDA: `memory_fraction` of the device's free memory after the model is loaded;
    - CPU: `memory_fraction` of a quarter of MemAvailable, at most 2 GiB, and at most 65,536 tokens (a CPU
      serves a few streams; a bigger cache would only hold memory the process needs elsewhere)."""
    if max_batch_total_tokens is not None:
        return math.ceil(max_batch_total_tokens / block_size)
    block_bytes = kv_bytes_per_token(model) * block_size
    device = _model_tensor(model).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        blocks = int(memory_fraction * free) // block_bytes
    else:
        budget = memory_fraction * min(CPU_MEMORY_SHARE * _mem_available(), CPU_MAX_BYTES)
        blocks = min(int(budget) // block_bytes, CPU_MAX_TOKENS // block_size)
    if blocks < 1:
        raise RuntimeError(f"no memory left for one KV block of {block_bytes} bytes")
    return blocks


def default_block_size(device: torch.device | str) -> int:
    """Tokens per block: what the CUDA paged flash kernel requires, a small block on CPU."""
    return CUDA_BLOCK_SIZE if torch.device(device).type == "cuda" else CPU_BLOCK_SIZE


class PagedKVCache:
    """Keys and values per layer, `[num_blocks, block_size, kv_heads_this_rank, head_dim]` in the model's
    dtype on its device. Every block a step reads is zeroed before its first use (attention masks the unused
    tail of a block, which must hold no NaN): on CUDA all at start; on CPU block by block in `prepare`, so
    the process commits memory only for blocks it has used (the pool reuses recently freed blocks first)."""

    def __init__(self, model: Any, num_blocks: int, block_size: int) -> None:
        layers, kv_heads, head_dim = kv_layout(model)
        like = _model_tensor(model)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        lazy = like.device.type == "cpu"
        make = torch.empty if lazy else torch.zeros
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.keys = [make(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self.values = [make(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self._unused = set(range(num_blocks)) if lazy else set()
        """Blocks no step has used yet (on CPU); empty once every block has been zeroed, and on CUDA."""

    def prepare(self, tables: Iterable[Sequence[int]]) -> None:
        """Zero the blocks of a step's block `tables`, and block 0 (it pads short tables), that no step has
        used yet. Costs nothing once every block has been used, and nothing on CUDA."""
        if not self._unused:
            return
        fresh = {0, *(b for table in tables for b in table)} & self._unused
        if not fresh:
            return
        index = torch.tensor(sorted(fresh), dtype=torch.long, device=self.keys[0].device)
        for tensor in (*self.keys, *self.values):
            tensor.index_fill_(0, index, 0)
        self._unused -= fresh
