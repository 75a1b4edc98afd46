# Triton ships no type information, and its kernels are written in its own typed language (tl.constexpr):
# mypy: disable-error-code="import-untyped, untyped-decorator, no-untyped-def"
"""Paged decode attention in Triton: one query token per row over its blocks of the paged KV cache.

Each program takes one row, one KV head and one split of the row's keys: it loads the row's query heads of
that KV head (GQA: query head `h` reads KV head `h // (Hq // Hkv)`) as one tile, walks the keys `BLOCK_N`
at a time through the block table (any block size: each key finds its own block), and keeps an online
softmax in float32. With one split it writes the output directly; with several (flash-decoding: long rows
at small batch, where `B * Hkv` programs would leave most of the GPU idle) each split writes its partial
output and log-sum-exp, and a second kernel combines them. Nothing reads device values on the host, so a
launch can be captured in a CUDA graph; rows of length 0 (padding rows) give zeros.

Under `TRITON_INTERPRET=1` (set before this module is imported, and while the kernels run) they run on
CPU tensors. They call only `triton.language` builtins and jit functions of this module: the library's own
jit functions (`tl.sum`, `tl.max`, `tl.zeros`, `tl.sigmoid`) are interpreted only when `triton` itself was
imported under `TRITON_INTERPRET=1`, which a test process that imported torch or transformers first has
not. The interpreter of Triton 3.9 multiplies bfloat16 dot operands as their raw 16-bit integers (its
`create_dot` converts only 8-bit floats), so when interpreted, bfloat16 dots take float32 operands;
compiled, they run in bfloat16 with float32 accumulation.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

SPLIT_MIN_KEYS = 512
"""A split reads at least this many keys: fewer and the combine step costs more than the parallelism
gains."""
MAX_SPLITS = 16


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    lens_ptr,
    out_ptr,
    lse_ptr,
    scale,
    softcap,
    window,
    chunk,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kt,
    stride_kh,
    stride_vn,
    stride_vt,
    stride_vh,
    stride_tb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    head_ok = heads < GROUP
    dim_ok = dims < HEAD_DIM
    q_heads = kv_head * GROUP + heads
    q = tl.load(
        q_ptr + row * stride_qb + q_heads[:, None] * stride_qh + dims[None, :],
        mask=head_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    length = tl.load(lens_ptr + row).to(tl.int32)
    lo = tl.maximum(split * chunk, length - window)
    hi = tl.minimum((split + 1) * chunk, length)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_H], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_D], 0.0, dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        page = tl.load(table_ptr + row * stride_tb + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        offset = (keys % BLOCK_SIZE).to(tl.int64)
        tile_ok = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(
            k_ptr
            + page[:, None] * stride_kn
            + offset[:, None] * stride_kt
            + kv_head * stride_kh
            + dims[None, :],
            mask=tile_ok,
            other=0.0,
        )
        if DOT_FP32:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if SOFTCAP:  # softcap * tanh(s / softcap), with tanh(x) = 2 / (1 + exp(-2x)) - 1
            scores = softcap * (2.0 / (1.0 + tl.exp(-2.0 * scores / softcap)) - 1.0)
        scores = scores * 1.4426950408889634  # log2(e): the softmax runs in base 2
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(scores, 1, _larger))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _add)
        v = tl.load(
            v_ptr
            + page[:, None] * stride_vn
            + offset[:, None] * stride_vt
            + kv_head * stride_vh
            + dims[None, :],
            mask=tile_ok,
            other=0.0,
        )
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    filled = l_i > 0
    out = acc / tl.where(filled, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + row * stride_ob + q_heads[:, None] * stride_oh + split * stride_os + dims[None, :],
        out,
        mask=head_ok[:, None] & dim_ok[None, :],
    )
    if SPLIT:
        lse = tl.where(filled, m_i + tl.log2(tl.where(filled, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row * stride_lb + q_heads * stride_lh + split, lse, mask=head_ok)


@triton.jit
def _combine_kernel(
    mid_ptr,
    lse_ptr,
    out_ptr,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_ok = splits < SPLITS
    lse = tl.load(lse_ptr + row * stride_lb + head * stride_lh + splits, mask=split_ok, other=float("-inf"))
    top = tl.reduce(lse, 0, _larger)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp2(lse - top)
    part = tl.load(
        mid_ptr + row * stride_mb + head * stride_mh + splits[:, None] * stride_ms + dims[None, :],
        mask=split_ok[:, None] & (dims < HEAD_DIM)[None, :],
        other=0.0,
    )
    total = tl.reduce(weight, 0, _add)
    out = tl.reduce(weight[:, None] * part, 0, _add) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, out, mask=dims < HEAD_DIM)


INTERPRETED = not isinstance(_decode_kernel, triton.runtime.JITFunction)
"""Whether the kernels were defined under `TRITON_INTERPRET=1` (they then run on CPU tensors)."""


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def splits_for(programs: int, max_keys: int, multiprocessors: int) -> int:
    """Splits of each row's keys: one where `programs` (rows x KV heads) fill the multiprocessors or rows
    are short, else enough to fill them, each split reading at least `SPLIT_MIN_KEYS` keys, at most
    `MAX_SPLITS`. From shapes only (no device read), so a CUDA graph captured for a batch size keeps its
    split."""
    if programs >= multiprocessors or max_keys < 2 * SPLIT_MIN_KEYS:
        return 1
    return min(-(-multiprocessors // programs), max_keys // SPLIT_MIN_KEYS, MAX_SPLITS)


def default_splits(programs: int, max_keys: int, device: torch.device) -> int:
    """`splits_for` on `device`'s multiprocessors; 1 off CUDA (the interpreter)."""
    return splits_for(programs, max_keys, _multiprocessors(device)) if device.type == "cuda" else 1


def decode_constants(
    dtype: torch.dtype, group: int, dim: int, block_size: int, softcap: bool, split: bool
) -> dict[str, int | bool | str]:
    """The decode kernel's compile-time arguments for a cache of `dtype` with `group` query heads per KV head
    of dimension `dim` in blocks of `block_size`."""
    block_d = max(16, triton.next_power_of_2(dim))  # tl.dot takes no dimension under 16
    return {
        "BLOCK_SIZE": block_size,
        "GROUP": group,
        "HEAD_DIM": dim,
        "BLOCK_H": max(16, triton.next_power_of_2(group)),
        "BLOCK_D": block_d,
        "BLOCK_N": 64 if block_d <= 128 else 32,
        "SOFTCAP": softcap,
        "SPLIT": split,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "DOT_FP32": INTERPRETED and dtype == torch.bfloat16,
    }


def paged_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """`[B, Hq, D]` attention output, in the query's dtype.

    `query` `[B, Hq, D]` (one token per row, at position `seq_lens[b] - 1`); `keys`, `values` `[num_blocks,
    block_size, Hkv, D]` (the `PagedKVCache` layout, with this step's keys already written); `block_table`
    `[B, max_blocks]` (int32 or int64); `seq_lens` `[B]`: keys per row, the query's own included. `scale`
    defaults to `D ** -0.5`; `softcap` caps the scaled logits (`softcap * tanh(s / softcap)`); `window` keeps
    the last `window` keys; `num_splits` defaults to `default_splits`."""
    rows, heads, dim = query.shape
    _, block_size, kv_heads, _ = keys.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if query.stride(-1) != 1:
        query = query.contiguous()
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("the KV cache's head dimension must be contiguous")
    max_keys = block_table.shape[1] * block_size
    splits = num_splits or default_splits(rows * kv_heads, max_keys, query.device)
    constants = decode_constants(query.dtype, heads // kv_heads, dim, block_size, bool(softcap), splits > 1)
    block_n = constants["BLOCK_N"]
    assert isinstance(block_n, int)
    per_split = -(-max_keys // splits)
    chunk = -(-per_split // block_n) * block_n  # whole tiles per split
    out = torch.empty_like(query)
    if splits == 1:
        target, lse = out, out  # lse is not written with one split
        out_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (0, 0)
    else:
        target = torch.empty(rows, heads, splits, dim, dtype=torch.float32, device=query.device)
        lse = torch.empty(rows, heads, splits, dtype=torch.float32, device=query.device)
        out_strides = (target.stride(0), target.stride(1), target.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1))
    scale = dim**-0.5 if scale is None else scale
    _decode_kernel[(rows, kv_heads, splits)](
        query,
        keys,
        values,
        block_table,
        seq_lens,
        target,
        lse,
        scale,
        softcap or 0.0,
        window or max_keys,  # no window: every key of the row
        chunk,
        query.stride(0),
        query.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        block_table.stride(0),
        *out_strides,
        *lse_strides,
        **constants,
    )
    if splits > 1:
        _combine_kernel[(rows, heads)](
            target,
            lse,
            out,
            target.stride(0),
            target.stride(1),
            target.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            SPLITS=splits,
            HEAD_DIM=dim,
            BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_D=constants["BLOCK_D"],
        )
    return out
