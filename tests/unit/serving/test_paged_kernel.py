"""The Triton paged decode kernel against SDPA and against the CPU paged attention on the same inputs, and the
choice of attention kernel.

Without CUDA the kernel runs through Triton's interpreter (`TRITON_INTERPRET=1` while its kernels are defined
and while they run); with CUDA the same tests run the compiled kernel on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INTERPRET = {} if CUDA else {"TRITON_INTERPRET": "1"}
_saved = {name: os.environ.get(name) for name in INTERPRET}
os.environ.update(INTERPRET)
from llm_serving.engine import attention  # noqa: E402
from llm_serving.engine.kernels import paged_decode as kernel  # noqa: E402
from llm_serving.engine.kernels.select import (  # noqa: E402
    Features,
    Kernel,
    choose,
    detect,
    paged_varlen_in,
)
from llm_serving.engine.kv_cache import CUDA_BLOCK_SIZE, PagedKVCache  # noqa: E402
from llm_serving.engine.runner import RowPlan, StepPlan, pack  # noqa: E402

for _name, _value in _saved.items():
    if _value is None:
        del os.environ[_name]
    else:
        os.environ[_name] = _value

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter reads `TRITON_INTERPRET` while a kernel runs, too."""
    assert CUDA or kernel.INTERPRETED, "paged_decode was imported before TRITON_INTERPRET was set"
    for name, value in INTERPRET.items():
        monkeypatch.setenv(name, value)


def _paged_inputs(
    lengths: list[int], heads: int, kv_heads: int, dim: int, block_size: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random query `[B, Hq, D]`, a cache of shuffled blocks, each row's block table (padded with other
    rows' blocks: they must be masked) and lengths."""
    generator = torch.Generator().manual_seed(seed)
    width = max(1, max(-(-n // block_size) for n in lengths))
    num_blocks = width * len(lengths) + 3
    keys = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    table = torch.randperm(num_blocks, generator=generator)[: width * len(lengths)].view(len(lengths), width)
    query = torch.randn(len(lengths), heads, dim, generator=generator).to(dtype)
    seq_lens = torch.tensor(lengths)
    return query.to(DEVICE), keys.to(DEVICE), values.to(DEVICE), table.int().to(DEVICE), seq_lens.to(DEVICE)


def _sdpa_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    table: torch.Tensor,
    lengths: list[int],
    scale: float,
) -> torch.Tensor:
    """Each row through SDPA over its keys gathered contiguously, in float32."""
    block_size = keys.shape[1]
    out = []
    for row, n in enumerate(lengths):
        blocks = table[row, : -(-n // block_size)].long()
        k = keys[blocks].flatten(0, 1)[:n].transpose(0, 1).unsqueeze(0).float()
        v = values[blocks].flatten(0, 1)[:n].transpose(0, 1).unsqueeze(0).float()
        q = query[row].unsqueeze(0).unsqueeze(2).float()
        out.append(F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize(
    ("lengths", "heads", "kv_heads", "dim", "block_size", "dtype", "splits"),
    [
        ([37], 4, 4, 32, 16, torch.float32, 1),  # one row, multi-head attention
        ([1, 16, 70], 8, 2, 64, 16, torch.bfloat16, 1),  # GQA 4: a lone token, one full block, ragged
        ([5, 33, 64, 2, 97], 8, 1, 32, 8, torch.float16, 2),  # multi-query, small blocks, two splits
        ([300, 9, 256, 130], 12, 4, 64, CUDA_BLOCK_SIZE, torch.bfloat16, 4),  # GQA 3, CUDA's block size
        ([50, 129], 4, 2, 80, 32, torch.float32, 3),  # head dim 80 (not a power of two)
        ([200, 3], 16, 2, 32, 16, torch.float16, 5),  # GQA 8; the short row leaves splits empty
        ([600], 8, 2, 64, 16, torch.float32, 1),  # ten tiles of keys in one program: the online softmax
    ],
)
def test_matches_sdpa(
    lengths: list[int],
    heads: int,
    kv_heads: int,
    dim: int,
    block_size: int,
    dtype: torch.dtype,
    splits: int,
) -> None:
    query, keys, values, table, seq_lens = _paged_inputs(lengths, heads, kv_heads, dim, block_size, dtype, 7)
    scale = dim**-0.5
    got = kernel.paged_decode(query, keys, values, table, seq_lens, scale, num_splits=splits)
    assert got.shape == query.shape
    assert got.dtype == dtype
    expected = _sdpa_reference(query, keys, values, table, lengths, scale)
    torch.testing.assert_close(got.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_splits_agree_and_empty_rows_give_zeros() -> None:
    """A length-0 row (a padding row) is zeros; any split count gives the same output."""
    lengths = [0, 140, 1]
    query, keys, values, table, seq_lens = _paged_inputs(lengths, 4, 2, 32, 16, torch.float32, 3)
    outs = [kernel.paged_decode(query, keys, values, table, seq_lens, 0.2, num_splits=n) for n in (1, 3, 8)]
    assert torch.equal(outs[0][0], torch.zeros_like(outs[0][0]))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1:], _sdpa_reference(query, keys, values, table, lengths, 0.2)[1:])


class _Model:
    """What `PagedKVCache` reads of a model: its config and one parameter (dtype, device)."""

    def __init__(
        self, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, device: torch.device = DEVICE
    ) -> None:
        self.config = SimpleNamespace(
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=dim,
            hidden_size=heads * dim,
            num_hidden_layers=1,
        )
        self._parameter = torch.empty(0, dtype=dtype, device=device)

    def parameters(self) -> Iterator[torch.Tensor]:
        yield self._parameter


@pytest.mark.parametrize(
    ("dtype", "window", "softcap"),
    [
        (torch.float32, None, None),
        (torch.float32, 24, None),
        (torch.float32, None, 20.0),
        (torch.float16, 40, None),
    ],
)
def test_matches_cpu_paged_attention(dtype: torch.dtype, window: int | None, softcap: float | None) -> None:
    """A step of decode rows of several length groups and a prefill chunk: the decode rows through the kernel
    equal today's SDPA path over the same cache, and the prefill chunk is untouched."""
    heads, kv_heads, dim, block_size = 8, 2, 32, 16
    cache = PagedKVCache(_Model(heads, kv_heads, dim, dtype), num_blocks=40, block_size=block_size)
    cache.prepare([range(40)])
    generator = torch.Generator().manual_seed(11)
    for tensor in (*cache.keys, *cache.values):
        tensor.copy_(torch.randn(tensor.shape, generator=generator).to(dtype))
    order = torch.randperm(40, generator=generator).tolist()
    decode_positions = [2, 39, 45, 150]
    rows = []
    for position in decode_positions:
        blocks = tuple(order.pop() for _ in range(position // block_size + 1))
        rows.append(RowPlan(tokens=(5,), start=position, blocks=blocks, sample=True))
    chunk = RowPlan(tokens=(1, 2, 3, 4, 5), start=20, blocks=(order.pop(), order.pop()), sample=True)
    rows.insert(2, chunk)
    packed = pack(StepPlan(rows=tuple(rows)), cache, DEVICE)
    assert len(packed.step.decode) > 1  # the rows span several length groups
    tokens = packed.input_ids.shape[1]
    query = torch.randn(1, heads, tokens, dim, generator=generator).to(dtype).to(DEVICE)
    key = torch.randn(1, kv_heads, tokens, dim, generator=generator).to(dtype).to(DEVICE)
    value = torch.randn(1, kv_heads, tokens, dim, generator=generator).to(dtype).to(DEVICE)
    module = SimpleNamespace(layer_idx=0, sliding_window=window)
    kwargs: dict[str, Any] = {"paged_step": packed.step, "softcap": softcap}
    with torch.inference_mode():
        served, _ = attention.paged_attention(module, query, key, value, None, scaling=0.3, **kwargs)
        expected = attention._sdpa_paged(module, query, key, value, packed.step, 0.3, window, softcap)
        got = attention._sdpa_paged(module, query, key, value, packed.step, 0.3, window, softcap, True)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(served, expected, atol=tolerance, rtol=tolerance)  # the kernel chosen here


COMPILE_FOR_SM90 = """
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from llm_serving.engine.kernels import paged_decode as m

dtype, split = getattr(torch, sys.argv[1]), sys.argv[2] == "split"
name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
constants = m.decode_constants(dtype, 4, 128, 256, True, split)
pointers = dict(q_ptr=name, k_ptr=name, v_ptr=name, table_ptr="i32", lens_ptr="i64")
pointers |= dict(out_ptr="fp32", lse_ptr="fp32") if split else dict(out_ptr=name, lse_ptr=name)
target = GPUTarget("cuda", 90, 32)

def build(fn, constants, pointers):
    signature = {
        arg: "constexpr" if arg in constants else "*" + pointers[arg] if arg in pointers
        else "fp32" if arg in ("scale", "softcap") else "i32"
        for arg in fn.arg_names
    }
    return triton.compile(ASTSource(fn, signature, constants), target=target)

decode = build(m._decode_kernel, constants, pointers)
if split:
    combine = dict(SPLITS=5, HEAD_DIM=128, BLOCK_S=8, BLOCK_D=128)
    build(m._combine_kernel, combine, dict(mid_ptr="fp32", lse_ptr="fp32", out_ptr=name))
print(decode.asm["ptx"].count("mma"))
"""


@pytest.mark.parametrize(("dtype", "split"), [("bfloat16", "split"), ("float32", "one")])
def test_kernels_compile_for_sm90(dtype: str, split: str, tmp_path: Path) -> None:
    """What the interpreter cannot check: the kernels lower to sm_90 machine code (Triton's own ptxas, no GPU
    needed), half-precision dots on tensor cores (`mma`), float32 ones exact (no `mma`: no tf32)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    script = [sys.executable, "-c", COMPILE_FOR_SM90, dtype, split]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    mma = int(done.stdout.split()[-1])
    assert mma > 0 if dtype == "bfloat16" else mma == 0


def test_splits_for() -> None:
    assert kernel.splits_for(programs=132, max_keys=32768, multiprocessors=132) == 1  # the grid is full
    assert kernel.splits_for(programs=8, max_keys=kernel.SPLIT_MIN_KEYS, multiprocessors=132) == 1  # short
    assert kernel.splits_for(programs=8, max_keys=4096, multiprocessors=132) == 4096 // kernel.SPLIT_MIN_KEYS
    assert kernel.splits_for(programs=8, max_keys=1 << 20, multiprocessors=132) == kernel.MAX_SPLITS
    assert kernel.splits_for(programs=64, max_keys=1 << 20, multiprocessors=132) == 3  # fills 132 SMs


HALF = (torch.float16, torch.bfloat16)
TORCH_2_11 = (
    "query",
    "key",
    "value",
    "cu_seq_q",
    "cu_seq_k",
    "max_q",
    "max_k",
    "return_aux",
    "scale",
    "window_size",
)


@pytest.mark.parametrize(
    ("device", "dtype", "block_size", "features", "kernel_"),
    [
        *(
            ("cpu", d, 256, Features(p, t), Kernel.SDPA)
            for d in HALF
            for p in (False, True)
            for t in (False, True)
        ),
        ("cuda", torch.bfloat16, 256, Features(True, True), Kernel.VARLEN),
        ("cuda", torch.float16, 512, Features(True, False), Kernel.VARLEN),
        ("cuda", torch.float32, 256, Features(True, True), Kernel.TRITON),  # flash takes no float32
        ("cuda", torch.bfloat16, 16, Features(True, True), Kernel.TRITON),  # nor pages of 16 tokens
        ("cuda", torch.bfloat16, 256, Features(False, True), Kernel.TRITON),  # torch 2.11
        ("cuda", torch.bfloat16, 256, Features(False, False), Kernel.SDPA),
        ("cuda", torch.float32, 256, Features(True, False), Kernel.SDPA),
    ],
)
def test_choose(
    device: str, dtype: torch.dtype, block_size: int, features: Features, kernel_: Kernel
) -> None:
    assert choose(device, dtype, block_size, features) is kernel_


def test_paged_varlen_detection() -> None:
    """torch 2.11's `varlen_attn` takes no block table; the signature from 2.12 on does."""
    assert not paged_varlen_in(TORCH_2_11)
    assert paged_varlen_in((*TORCH_2_11, "enable_gqa", "seqused_k", "block_table", "num_splits"))
    installed = tuple(int(part) for part in torch.__version__.split(".")[:2])
    assert detect(torch.device("cpu")).paged_varlen == (installed >= (2, 12))
    assert detect(torch.device("cpu")).triton  # a dependency of torch on Linux


def test_cpu_cache_keeps_sdpa() -> None:
    cpu = torch.device("cpu")
    cache = PagedKVCache(_Model(4, 2, 16, torch.bfloat16, cpu), num_blocks=2, block_size=CUDA_BLOCK_SIZE)
    assert attention.kernel_for(cache) is Kernel.SDPA
    assert not attention.cuda_kernel_applies(cache)
