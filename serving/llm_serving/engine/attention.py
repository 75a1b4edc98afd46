"""Attention over the paged KV cache, registered with transformers as `llm_paged`.

The model runs one packed `[1, T]` sequence; the step's `PagedStep` reaches every attention layer through the
forward's keyword arguments (`paged_step=`). Each layer writes its new keys and values into the blocks at the
step's slot mapping, then attends per row over the row's blocks with the kernel `kernels.select.choose` picks
for the cache: on CPU with SDPA, decode rows of similar lengths in one call and each prefill chunk in its own;
on CUDA with torch's paged varlen flash attention where the installed torch has it, else with our Triton paged
decode kernel for the decode rows (SDPA for prefill chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from llm_serving.engine.kernels.select import Kernel, choose, detect
from llm_serving.engine.kv_cache import PagedKVCache

NAME = "llm_paged"


@dataclass(frozen=True)
class DecodeRows:
    """Rows of one query token each, attended together: their blocks gathered into `[B, L]` keys (rows of
    similar lengths, so that little of `L` is padding)."""

    tokens: torch.Tensor  # [B] indices of the rows' tokens in the packed sequence
    blocks: torch.Tensor  # [B * max_blocks] block ids, padded with block 0 (masked)
    positions: torch.Tensor  # [B, 1] position of each row's token
    max_blocks: int


@dataclass(frozen=True)
class PrefillRow:
    """A chunk of `count` prompt tokens at packed offset `offset`, at positions `start` onwards."""

    offset: int
    count: int
    start: int
    blocks: torch.Tensor  # [ceil((start + count) / block_size)] block ids


@dataclass(frozen=True)
class Varlen:
    """The CUDA kernel's view of the step: cumulative lengths, KV lengths and a padded block table."""

    cu_seq_q: torch.Tensor  # [R + 1] int32
    cu_seq_k: torch.Tensor  # [R + 1] int32
    seqused_k: torch.Tensor  # [R] int32
    block_table: torch.Tensor  # [R, max_blocks] int32
    max_q: int
    max_k: int


@dataclass(frozen=True)
class PagedStep:
    """Everything the attention layers need for one step, built once by the runner."""

    cache: PagedKVCache
    slots: torch.Tensor  # [T] cache slot (block * block_size + offset) of each packed token
    decode: tuple[DecodeRows, ...]
    prefills: tuple[PrefillRow, ...]
    varlen: Varlen | None = None
    _masks: dict[tuple[str, int, int | None], torch.Tensor | None] = field(default_factory=dict, repr=False)

    def decode_mask(self, index: int, window: int | None) -> torch.Tensor:
        """`[B, 1, 1, L]`: key positions at most the row's position (and within the sliding window)."""
        key = ("decode", index, window)
        if key not in self._masks:
            rows = self.decode[index]
            size = rows.max_blocks * self.cache.block_size
            keys = torch.arange(size, device=self.slots.device).unsqueeze(0)
            mask = keys <= rows.positions
            if window is not None:
                mask &= keys > rows.positions - window
            self._masks[key] = mask[:, None, None, :]
        found = self._masks[key]
        assert found is not None
        return found

    def decode_lengths(self, index: int) -> torch.Tensor:
        """`[B]`: keys of each row of decode group `index`, its own token included."""
        key = ("lengths", index, None)
        if key not in self._masks:
            self._masks[key] = self.decode[index].positions[:, 0] + 1
        found = self._masks[key]
        assert found is not None
        return found

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor | None:
        """`[1, 1, count, start + count]` causal mask with the cached prefix; None when SDPA's `is_causal`
        gives the same (no prefix, no window)."""
        row = self.prefills[index]
        key = ("prefill", index, window)
        if key not in self._masks:
            if row.start == 0 and window is None:
                self._masks[key] = None
            else:
                device = self.slots.device
                queries = torch.arange(row.start, row.start + row.count, device=device).unsqueeze(1)
                keys = torch.arange(row.start + row.count, device=device).unsqueeze(0)
                mask = keys <= queries
                if window is not None:
                    mask &= keys > queries - window
                self._masks[key] = mask[None, None]
        return self._masks[key]


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """SDPA over `[B, H, Lq, D]` queries and `[B, Hkv, L, D]` keys (GQA); eager math when logits are capped.
    A None mask means causal."""
    groups = query.shape[1] // key.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=groups > 1
        )
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    scores = scores.masked_fill(~mask, -math.inf)
    return scores.float().softmax(dim=-1).to(value.dtype) @ value


def _window(module: Any, kwargs: dict[str, Any]) -> int | None:
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    return int(window) if window else None


def _sdpa_paged(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    step: PagedStep,
    scaling: float | None,
    window: int | None,
    softcap: float | None,
    decode_kernel: bool = False,
) -> torch.Tensor:
    """`[1, T, H, D]`: each group of decode rows in one call (with SDPA over its gathered blocks, or, with
    `decode_kernel`, the Triton paged decode kernel over the cache), each prefill chunk on its own."""
    cache = step.cache
    keys, values = cache.keys[module.layer_idx], cache.values[module.layer_idx]
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for index, decode in enumerate(step.decode):
        rows = decode.tokens.numel()
        q = query[0].index_select(1, decode.tokens).transpose(0, 1)  # [B, H, D]
        if decode_kernel:
            from llm_serving.engine.kernels.paged_decode import paged_decode  # imports Triton: CUDA only

            table = decode.blocks.view(rows, decode.max_blocks)
            lengths = step.decode_lengths(index)
            attended = paged_decode(q, keys, values, table, lengths, scaling, softcap, window)
        else:
            width = decode.max_blocks * cache.block_size
            k = keys.index_select(0, decode.blocks).view(rows, width, *keys.shape[2:]).transpose(1, 2)
            v = values.index_select(0, decode.blocks).view(rows, width, *values.shape[2:]).transpose(1, 2)
            mask = step.decode_mask(index, window)
            attended = _attend(q.unsqueeze(2), k, v, mask, scaling, softcap).squeeze(2)
        out[0].index_copy_(0, decode.tokens, attended)
    for index, row in enumerate(step.prefills):
        end = row.offset + row.count
        q = query[:, :, row.offset : end]
        if row.start == 0:  # nothing cached before this chunk: its own keys and values are the whole row
            k, v = key[:, :, row.offset : end], value[:, :, row.offset : end]
        else:
            length = row.start + row.count
            k = keys.index_select(0, row.blocks).flatten(0, 1)[:length].transpose(0, 1).unsqueeze(0)
            v = values.index_select(0, row.blocks).flatten(0, 1)[:length].transpose(0, 1).unsqueeze(0)
        attended = _attend(q, k, v, step.prefill_mask(index, window), scaling, softcap)
        out[0, row.offset : end] = attended[0].transpose(0, 1)
    return out


def _cuda_paged(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    varlen: Varlen,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    """`[1, T, H, D]` from torch's paged varlen flash kernel (causal to the bottom right: a chunk sees its
    prefix)."""
    out = varlen_attn(
        query[0].transpose(0, 1).contiguous(),
        keys,
        values,
        varlen.cu_seq_q,
        varlen.cu_seq_k,
        varlen.max_q,
        varlen.max_k,
        scale=scaling,
        window_size=(window - 1 if window is not None else -1, 0),
        enable_gqa=True,
        seqused_k=varlen.seqused_k,
        block_table=varlen.block_table,
    )
    assert isinstance(out, torch.Tensor)
    return out.unsqueeze(0)


def paged_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: `[1, H, T, D]` queries, `[1, Hkv, T, D]` new keys and values;
    returns `([1, T, H, D], None)` as `sdpa_attention_forward` does."""
    step = kwargs.get("paged_step")
    if not isinstance(step, PagedStep):
        raise RuntimeError(
            f"the {NAME!r} attention runs only inside ModelRunner.execute (no paged_step given)"
        )
    if dropout:
        raise ValueError(f"{NAME!r} attention is for inference: dropout must be 0")
    cache = step.cache
    keys, values = cache.keys[module.layer_idx], cache.values[module.layer_idx]
    flat = (-1, *keys.shape[2:])
    keys.view(flat).index_copy_(0, step.slots, key[0].transpose(0, 1))
    values.view(flat).index_copy_(0, step.slots, value[0].transpose(0, 1))
    window = _window(module, kwargs)
    softcap = kwargs.get("softcap")
    if step.varlen is not None and softcap is None:
        return _cuda_paged(query, keys, values, step.varlen, scaling, window), None
    decode_kernel = keys.is_cuda and kernel_for(cache) is Kernel.TRITON
    return _sdpa_paged(module, query, key, value, step, scaling, window, softcap, decode_kernel), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The model builds no `[T, T]` mask: the rows' masks come from `PagedStep`."""
    return None


def kernel_for(cache: PagedKVCache) -> Kernel:
    """The attention kernel for this cache, from what this process's torch and Triton offer on its device."""
    keys = cache.keys[0]
    return choose(keys.device.type, keys.dtype, cache.block_size, detect(keys.device))


def cuda_kernel_applies(cache: PagedKVCache) -> bool:
    """Whether torch's paged varlen flash kernel runs over this cache (the runner then builds `Varlen`)."""
    return kernel_for(cache) is Kernel.VARLEN


AttentionInterface.register(NAME, paged_attention)
AttentionMaskInterface.register(NAME, _no_mask)
