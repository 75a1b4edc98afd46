"""Which attention kernel runs over a paged KV cache: a pure choice (`choose`) from what the installed
torch and Triton offer (`detect`).

- `VARLEN`: torch's paged varlen flash attention (`torch.nn.attention.varlen.varlen_attn` with `block_table`,
  `seqused_k` and `enable_gqa`: torch 2.12 on; torch 2.11's takes none of them) for every row of a step, on
  CUDA, in half precision, over pages of a multiple of `kv_cache.CUDA_BLOCK_SIZE` tokens (flash's paged-KV
  rule).
- `TRITON`: our Triton paged decode kernel (`paged_decode`) for the decode rows, SDPA for prefill chunks; on
  CUDA wherever `VARLEN` does not apply (older torch, float32, other block sizes) and Triton is installed.
- `SDPA`: today's path (decode rows gathered per length group, SDPA per group and per prefill chunk): always
  on CPU, and on CUDA without Triton.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import inspect
from collections.abc import Collection
from dataclasses import dataclass

import torch

from llm_serving.engine.kv_cache import CUDA_BLOCK_SIZE

PAGED_VARLEN_PARAMETERS = frozenset({"block_table", "seqused_k", "enable_gqa"})
"""What `varlen_attn` must take to attend over a paged GQA cache."""


class Kernel(enum.Enum):
    VARLEN = "varlen"
    TRITON = "triton"
    SDPA = "sdpa"


@dataclass(frozen=True)
class Features:
    """What the installed libraries offer on a device."""

    paged_varlen: bool
    """torch's `varlen_attn` takes a paged GQA cache, and (on CUDA) ran on one."""
    triton: bool
    """Triton is installed."""


def paged_varlen_in(parameters: Collection[str]) -> bool:
    """Whether a `varlen_attn` with these parameter names attends over a paged GQA cache."""
    return set(parameters) >= PAGED_VARLEN_PARAMETERS


def choose(device_type: str, dtype: torch.dtype, block_size: int, features: Features) -> Kernel:
    """The kernel for a cache of `dtype` in blocks of `block_size` tokens on a `device_type` device."""
    if device_type != "cuda":
        return Kernel.SDPA
    half = dtype in (torch.float16, torch.bfloat16)
    if features.paged_varlen and half and block_size % CUDA_BLOCK_SIZE == 0:
        return Kernel.VARLEN
    return Kernel.TRITON if features.triton else Kernel.SDPA


def _varlen_parameters() -> tuple[str, ...]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch before 2.10
        return ()
    return tuple(inspect.signature(varlen_attn).parameters)


def _varlen_runs(device: torch.device) -> bool:
    """One tiny paged call on `device`: the op can exist and still refuse the device (flash not built for
    its architecture, say)."""
    from torch.nn.attention.varlen import varlen_attn

    pages = torch.zeros(1, CUDA_BLOCK_SIZE, 1, 64, dtype=torch.float16, device=device)
    one = torch.tensor([0, 1], dtype=torch.int32, device=device)
    try:
        varlen_attn(
            torch.zeros(1, 2, 64, dtype=torch.float16, device=device),
            pages,
            pages,
            one,
            one,
            1,
            1,
            enable_gqa=True,
            seqused_k=one[1:],
            block_table=torch.zeros(1, 1, dtype=torch.int32, device=device),
        )
    except RuntimeError:
        return False
    return True


@functools.cache
def detect(device: torch.device) -> Features:
    """What this process's torch and Triton offer on `device` (probed once per device)."""
    paged = paged_varlen_in(_varlen_parameters())
    if paged and device.type == "cuda":
        paged = _varlen_runs(device)
    return Features(paged_varlen=paged, triton=importlib.util.find_spec("triton") is not None)
