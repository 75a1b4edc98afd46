"""CUDA graphs of the decode forward, per bucketed batch size, over static input buffers.

A decode-only step (every row one token, sampled, no prompt log-probs, no LoRA adapter) is padded up to the
smallest bucket (1, 2, 4, 8, ..., the maximal batch) that holds it and run over that bucket's static buffers:
token ids, positions, cache slots, sequence lengths and block tables, one flat int64 tensor filled from one
pinned host buffer with one non-blocking copy. Padded rows decode token 0 at position 0 into a scratch KV
block no request owns; their logits are dropped. On CUDA each bucket's forward (paged attention included,
and a tensor-parallel model's all-reduces) is captured once at start-up and replayed per step;
`capture=False` runs the same forward eagerly (CPU tests, and the fallback when capture fails). Prefill and
mixed steps never come here: the runner runs them eagerly.

The bucket choice and the buffer contents (`batch_buckets`, `bucket_for`, `graphable`, `decode_inputs`) are
pure and tested on CPU.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from llm_serving.engine.attention import DecodeRows, PagedStep, Varlen
from llm_serving.engine.kv_cache import PagedKVCache

if TYPE_CHECKING:
    from llm_serving.engine.runner import RowPlan, StepPlan

log = logging.getLogger("llm_serving.engine")

FIELDS = 4
"""Per-row int64 fields before the block tables in the flat buffer: token, position, slot, sequence length."""


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below `max_batch`, then `max_batch` itself: the batch sizes captured."""
    if max_batch < 1:
        raise ValueError("max_batch must be positive")
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


def bucket_for(rows: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding `rows` rows (None: more rows than the largest)."""
    return next((b for b in buckets if b >= rows), None)


def graphable(rows: Sequence[RowPlan], width: int, block_size: int) -> bool:
    """Whether a step is decode-only and fits the static buffers: one sampled token per row, no prompt
    log-probs, the base model, at most `width` blocks of `block_size` tokens per row."""
    return bool(rows) and all(
        len(r.tokens) == 1
        and r.sample
        and not r.logprob_targets
        and r.adapter is None
        and r.start < width * block_size
        for r in rows
    )


@dataclass(frozen=True)
class DecodeInputs:
    """One bucket's buffer contents, padded to `len(tokens)` rows (host lists)."""

    tokens: list[int]
    positions: list[int]
    slots: list[int]
    lengths: list[int]
    """KV length of each row after this step (its position + 1)."""
    tables: list[int]
    """Row-major `[rows, width]` block ids; past a row's own blocks, its first block (masked, finite)."""

    def flat(self) -> list[int]:
        """The layout of the device buffer: tokens | positions | slots | lengths | tables."""
        return [*self.tokens, *self.positions, *self.slots, *self.lengths, *self.tables]


def decode_inputs(
    rows: Sequence[RowPlan], bucket: int, width: int, block_size: int, scratch: int
) -> DecodeInputs:
    """The buffers of `rows` padded to `bucket` rows; a padded row decodes token 0 at position 0 into block
    `scratch`."""
    if len(rows) > bucket:
        raise ValueError(f"{len(rows)} rows do not fit a bucket of {bucket}")
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    lengths: list[int] = []
    tables: list[int] = []
    for row in rows:
        position = row.start
        blocks = row.blocks[: position // block_size + 1]
        if len(blocks) * block_size <= position or len(blocks) > width:
            raise ValueError(f"a decode row at position {position} with {len(row.blocks)} blocks")
        tokens.append(row.tokens[0])
        positions.append(position)
        slots.append(blocks[position // block_size] * block_size + position % block_size)
        lengths.append(position + 1)
        tables.extend((*blocks, *(blocks[0],) * (width - len(blocks))))
    padding = bucket - len(rows)
    tokens += [0] * padding
    positions += [0] * padding
    slots += [scratch * block_size] * padding
    lengths += [1] * padding
    tables += [scratch] * (padding * width)
    return DecodeInputs(tokens, positions, slots, lengths, tables)


class _Bucket:
    """One batch size: its view of the flat device buffer, its captured graph and the graph's output."""

    def __init__(self, rows: int, width: int, buffer: torch.Tensor) -> None:
        self.rows = rows
        self.size = rows * (FIELDS + width)
        self.buffer = buffer[: self.size]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        """The captured forward's output `[rows, V]` (the graph writes it on every replay)."""


class DecodeGraphs:
    """Decode steps over bucketed static buffers: captured CUDA graphs, or (`capture=False`) the same forward
    run eagerly. `run` returns a step's next-token logits `[rows, V]` on the device, or None when the step is
    not decode-only or does not fit (the caller runs it eagerly)."""

    def __init__(
        self,
        model: Any,
        cache: PagedKVCache,
        max_batch: int,
        width: int,
        scratch: int,
        cuda_kernel: bool,
        capture: bool,
    ) -> None:
        self.model = model
        self.cache = cache
        self.width = width
        self.scratch = scratch
        self.buckets = batch_buckets(max_batch)
        self._cuda_kernel = cuda_kernel
        self._capture = capture
        self.device = cache.keys[0].device
        largest = max(self.buckets) * (FIELDS + width)
        self._device_buffer = torch.zeros(largest, dtype=torch.long, device=self.device)
        pinned = self.device.type == "cuda"
        # Two pinned host buffers, used in turn: one may still be copying while the next step fills the other.
        self._host = [torch.zeros(largest, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._buckets = {b: _Bucket(b, width, self._device_buffer) for b in self.buckets}
        self.capture_seconds = 0.0
        """Start-up time spent capturing (0 when nothing was captured)."""

    @property
    def captured(self) -> bool:
        return all(b.graph is not None for b in self._buckets.values())

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        """The decode forward over `bucket`'s buffers: `[rows, V]` logits. Every tensor the attention needs is
        derived from the static buffer inside this function, so that a capture records its computation."""
        rows, width, bs = bucket.rows, self.width, self.cache.block_size
        fields = bucket.buffer[: rows * FIELDS].view(FIELDS, rows)
        tokens, positions, slots, lengths = fields[0], fields[1], fields[2], fields[3]
        table = bucket.buffer[rows * FIELDS :].view(rows, width)
        varlen = None
        if self._cuda_kernel:
            lengths32 = lengths.to(torch.int32)
            varlen = Varlen(
                cu_seq_q=torch.arange(rows + 1, dtype=torch.int32, device=self.device),
                cu_seq_k=torch.nn.functional.pad(lengths32.cumsum(0, dtype=torch.int32), (1, 0)),
                seqused_k=lengths32,
                block_table=table.to(torch.int32),
                max_q=1,
                max_k=width * bs,
            )
        step = PagedStep(
            cache=self.cache,
            slots=slots,
            decode=(
                DecodeRows(
                    tokens=torch.arange(rows, device=self.device),
                    blocks=table.flatten(),
                    positions=positions.view(rows, 1),
                    max_blocks=width,
                ),
            ),
            prefills=(),
            varlen=varlen,
        )
        out = self.model(
            input_ids=tokens.view(1, rows),
            position_ids=positions.view(1, rows),
            use_cache=False,
            logits_to_keep=0,
            paged_step=step,
        )
        logits: torch.Tensor = out.logits[0]
        return logits

    def _load(self, bucket: _Bucket, values: list[int]) -> None:
        """Copy `values` into `bucket`'s device buffer through the next pinned host buffer."""
        turn = self._turn
        self._turn = 1 - turn
        event = self._copied[turn]
        if event is not None:
            event.synchronize()  # that buffer's previous copy has finished reading it
        host = self._host[turn][: bucket.size]
        host.copy_(torch.tensor(values, dtype=torch.long))
        bucket.buffer.copy_(host, non_blocking=True)
        if self.device.type == "cuda":
            recorded = torch.cuda.Event()  # type: ignore[no-untyped-call]
            recorded.record()
            self._copied[turn] = recorded

    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """Next-token logits `[rows, V]` of a decode-only `plan` (in row order, on the device), or None."""
        rows = plan.rows
        size = bucket_for(len(rows), self.buckets)
        if size is None or not graphable(rows, self.width, self.cache.block_size):
            return None
        bucket = self._buckets[size]
        inputs = decode_inputs(rows, size, self.width, self.cache.block_size, self.scratch)
        self.cache.prepare([*(r.blocks for r in rows), (self.scratch,)])
        self._load(bucket, inputs.flat())
        if bucket.graph is None:
            return self._forward(bucket)[: len(rows)]
        bucket.graph.replay()
        assert bucket.logits is not None
        return bucket.logits[: len(rows)]

    def capture_all(self, agree: Callable[[bool], bool] | None = None) -> bool:
        """Capture every bucket, largest first into one shared memory pool (call inside inference mode and
        the paged attention). On failure every graph is dropped and decode stays eager; `agree` settles the
        outcome with the other tensor-parallel ranks (all capture, or none). Returns whether graphs are
        used."""
        if not self._capture:
            return False
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            pool = torch.cuda.graph_pool_handle()
            for size in sorted(self.buckets, reverse=True):
                bucket = self._buckets[size]
                # Padding only: the warm-up and capture forwards write nothing but the scratch block.
                padding = decode_inputs((), size, self.width, self.cache.block_size, self.scratch)
                self._load(bucket, padding.flat())
                side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm-up: lazy initialisation, autotuning, NCCL communicators
                        self._forward(bucket)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    bucket.logits = self._forward(bucket)
                bucket.graph = graph
            torch.cuda.synchronize()
        except Exception as exc:  # any failure leaves decode eager, which is correct, only slower
            error = exc
        ok = error is None
        if agree is not None:
            ok = agree(ok)
        if not ok:
            for bucket in self._buckets.values():
                bucket.graph, bucket.logits = None, None
            reason = f"{type(error).__name__}: {error}" if error else "another rank's capture failed"
            log.warning("CUDA graphs: capture failed (%s); decode steps run eagerly", reason)
            return False
        self.capture_seconds = time.perf_counter() - start
        log.info(
            "CUDA graphs: decode captured for batch sizes %s in %.2f s",
            ",".join(map(str, self.buckets)),
            self.capture_seconds,
        )
        return True


class StepGaps:
    """The GPU's idle time between consecutive steps, from CUDA events recorded when a step's first work is
    queued and after its last: gap = (this step's start) - (the previous step's end), once both have run."""

    def __init__(self, keep: int = 4096) -> None:
        self._last_end: torch.cuda.Event | None = None
        self._start: torch.cuda.Event | None = None
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.gaps_ms: deque[float] = deque(maxlen=keep)

    def begin(self) -> None:
        """Before the step's first GPU work is queued."""
        self._start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        self._start.record()

    def end(self) -> None:
        """After the step's last GPU work is queued (its results are read after this)."""
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end.record()
        if self._last_end is not None and self._start is not None:
            self._pending.append((self._last_end, self._start))
        self._last_end, self._start = end, None
        done = [p for p in self._pending if p[1].query()]  # type: ignore[no-untyped-call]
        for previous, start in done:
            self.gaps_ms.append(previous.elapsed_time(start))
        self._pending = [p for p in self._pending if p not in done]

    def reset(self) -> None:
        """Forget the steps so far (the next step starts a new series: no gap across idle periods)."""
        self._last_end, self._start, self._pending = None, None, []
        self.gaps_ms.clear()
