"""Runs the model for one step: the scheduled rows as one packed `[1, T]` sequence over the paged KV cache.

Every rank executes the same `StepPlan`; under tensor parallelism rank 0 broadcasts it first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from llm_serving.engine import attention
from llm_serving.engine.attention import DecodeRows, PagedStep, PrefillRow, Varlen
from llm_serving.engine.graphs import DecodeGraphs, StepGaps
from llm_serving.engine.kv_cache import PagedKVCache
from llm_serving.engine.lora import LoraBatch, LoraLayers, lora_batch


@dataclass(frozen=True)
class RowPlan:
    """One row of a step, as plain data (broadcast to the other tensor-parallel ranks as is)."""

    tokens: tuple[int, ...]
    """Tokens run this step."""
    start: int
    """Position of `tokens[0]`."""
    blocks: tuple[int, ...]
    """Block table covering positions `[0, start + len(tokens))`."""
    sample: bool
    """Return the next-token logits of the last token."""
    logprob_targets: tuple[int, ...] = ()
    """Return log p(`targets[j]`) at position `start + j`."""
    adapter: str | None = None
    """The LoRA adapter the row runs with (None: the base model)."""


@dataclass(frozen=True)
class StepPlan:
    """One step, as plain data that can be sent to other ranks."""

    rows: tuple[RowPlan, ...]


@dataclass(frozen=True)
class StepLogits:
    """Next-token logits `[rows with sample=True, V]` (float32, in row order: on the CPU, or on the model's
    device for a runner with `device_logits`) and, per row, the prompt log-probs asked for (`[]` if none)."""

    logits: torch.Tensor
    prompt_logprobs: tuple[list[float], ...]


@dataclass(frozen=True)
class _Packed:
    """A plan's tensors: inputs, attention metadata, and the positions projected to the vocabulary."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    step: PagedStep
    keep: torch.Tensor
    num_sample: int
    targets: torch.Tensor
    lora: LoraBatch | None = None


def _varlen(plan: StepPlan, block_size: int, device: torch.device) -> Varlen:
    lengths = [len(r.tokens) for r in plan.rows]
    kv = [r.start + len(r.tokens) for r in plan.rows]
    width = max(-(-n // block_size) for n in kv)
    table = [list(r.blocks[:width]) + [0] * (width - len(r.blocks[:width])) for r in plan.rows]

    def cumulative(values: list[int]) -> torch.Tensor:
        return torch.tensor([0, *values], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)

    return Varlen(
        cu_seq_q=cumulative(lengths),
        cu_seq_k=cumulative(kv),
        seqused_k=torch.tensor(kv, dtype=torch.int32).to(device),
        block_table=torch.tensor(table, dtype=torch.int32).to(device),
        max_q=max(lengths),
        max_k=max(kv),
    )


def group_by_length(blocks: list[int], waste: float = 2.0) -> list[list[int]]:
    """Indices of rows needing `blocks[i]` blocks, grouped so that each group, padded to its longest row,
    gathers at most `waste` times the blocks its rows need (a long row does not pad the short ones)."""
    order = sorted(range(len(blocks)), key=lambda i: -blocks[i])
    groups: list[list[int]] = []
    used = 0
    for i in order:
        if groups and blocks[groups[-1][0]] * (len(groups[-1]) + 1) <= waste * (used + blocks[i]):
            groups[-1].append(i)
            used += blocks[i]
        else:
            groups.append([i])
            used = blocks[i]
    return groups


def _decode_rows(
    rows: list[tuple[int, int, tuple[int, ...]]], device: torch.device
) -> tuple[DecodeRows, ...]:
    """(packed offset, position, blocks) of each one-token row, as groups of similar lengths."""
    groups = []
    for group in group_by_length([len(rows[i][2]) for i in range(len(rows))]):
        width = len(rows[group[0]][2])
        padded = [rows[i][2] + (0,) * (width - len(rows[i][2])) for i in group]
        groups.append(
            DecodeRows(
                tokens=torch.tensor([rows[i][0] for i in group], dtype=torch.long).to(device),
                blocks=torch.tensor(padded, dtype=torch.long).flatten().to(device),
                positions=torch.tensor([[rows[i][1]] for i in group], dtype=torch.long).to(device),
                max_blocks=width,
            )
        )
    return tuple(groups)


def pack(
    plan: StepPlan,
    cache: PagedKVCache,
    device: torch.device,
    cuda_kernel: bool = False,
    lora: LoraLayers | None = None,
) -> _Packed:
    """Every tensor of a step, built once (not per layer): ids, positions, slot mapping, block tables, and the
    token -> LoRA adapter grouping when adapters are installed."""
    bs = cache.block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    decode: list[tuple[int, int, tuple[int, ...]]] = []
    prefills: list[tuple[int, int, int, tuple[int, ...]]] = []
    sample_at: list[int] = []
    logprob_at: list[int] = []
    targets: list[int] = []
    for row in plan.rows:
        offset, count = len(ids), len(row.tokens)
        end = row.start + count
        blocks = row.blocks[: -(-end // bs)]
        if not count or len(blocks) * bs < end:
            raise ValueError(f"a row of {count} tokens up to position {end} with {len(row.blocks)} blocks")
        ids.extend(row.tokens)
        span = range(row.start, end)
        positions.extend(span)
        slots.extend(blocks[p // bs] * bs + p % bs for p in span)
        if count == 1:
            decode.append((offset, row.start, blocks))
        else:
            prefills.append((offset, count, row.start, blocks))
        if row.sample:
            sample_at.append(offset + count - 1)
        logprob_at.extend(range(offset, offset + len(row.logprob_targets)))
        targets.extend(row.logprob_targets)
    cache.prepare(row.blocks for row in plan.rows)
    step = PagedStep(
        cache=cache,
        slots=torch.tensor(slots, dtype=torch.long).to(device),
        decode=_decode_rows(decode, device),
        prefills=tuple(
            PrefillRow(offset=o, count=c, start=s, blocks=torch.tensor(b, dtype=torch.long).to(device))
            for o, c, s, b in prefills
        ),
        varlen=_varlen(plan, bs, device) if cuda_kernel else None,
    )
    return _Packed(
        input_ids=torch.tensor([ids], dtype=torch.long).to(device),
        position_ids=torch.tensor([positions], dtype=torch.long).to(device),
        step=step,
        keep=torch.tensor(sample_at + logprob_at, dtype=torch.long).to(device),
        num_sample=len(sample_at),
        targets=torch.tensor(targets, dtype=torch.long).to(device),
        lora=_lora_batch(plan, lora, device),
    )


def _lora_batch(plan: StepPlan, lora: LoraLayers | None, device: torch.device) -> LoraBatch | None:
    """The step's token -> adapter grouping; ValueError for a row naming an adapter that is not installed."""
    if lora is None:
        named = [r.adapter for r in plan.rows if r.adapter is not None]
        if named:
            raise ValueError(f"LoRA adapter {named[0]!r} is not loaded")
        return None
    return lora_batch([lora.slot(r.adapter) for r in plan.rows], [len(r.tokens) for r in plan.rows], device)


@contextmanager
def _attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Run the model with attention `name`, restoring its own afterwards (so `generate` keeps working)."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def check_attention_backend(model: Any) -> None:
    """The runner's attention reaches the model through transformers' `AttentionInterface`. A model whose code
    does not dispatch through it would ignore the paged attention and attend across the whole packed sequence
    (wrong tokens, no error): refuse it here."""
    if not getattr(model, "_supports_attention_backend", False):
        raise RuntimeError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface; "
            "llm_serving cannot run it over its paged KV cache"
        )


class ModelRunner:
    """Owns the model and this rank's share of the paged KV cache; decode-only steps go through `graphs` when
    given (CUDA), every other step (and every step on CPU) through the eager packed forward."""

    def __init__(
        self,
        model: Any,
        cache: PagedKVCache,
        broadcast: Callable[[StepPlan | None], None] | None = None,
        lora: LoraLayers | None = None,
        graphs: DecodeGraphs | None = None,
        device_logits: bool = False,
    ) -> None:
        self.model = model
        self.device_logits = device_logits
        """Leave the step's logits on the device (a device sampler takes them there)."""
        self.cache = cache
        self.lora = lora
        self.graphs = graphs
        self.device = next(model.parameters()).device
        self._broadcast = broadcast
        self._cuda_kernel = attention.cuda_kernel_applies(cache)
        self.gaps = StepGaps() if self.device.type == "cuda" else None
        """The GPU's idle time between steps (CUDA only): from `step_done` of one step to the start of the
        next `execute`."""
        check_attention_backend(model)

    def capture(self, agree: Callable[[bool], bool] | None = None) -> bool:
        """Capture the decode graphs (at start-up, on every rank in the same order); False when there are none
        or their capture failed (decode then runs eagerly over the same static buffers)."""
        if self.graphs is None:
            return False
        with torch.inference_mode(), _attention_implementation(self.model, attention.NAME):
            return self.graphs.capture_all(agree)

    def execute(self, plan: StepPlan) -> StepLogits:
        """Run one step on this rank (broadcasting the plan first on rank 0 of a TP group)."""
        if self._broadcast is not None:
            self._broadcast(plan)
        if not plan.rows:
            return StepLogits(logits=torch.empty(0, 0), prompt_logprobs=())
        with torch.inference_mode(), _attention_implementation(self.model, attention.NAME):
            if self.gaps is not None:
                self.gaps.begin()
            decoded = self._decode(plan)
            result = decoded if decoded is not None else self._packed(plan)
        return result

    def step_done(self) -> None:
        """The step's last GPU work (its sampling included) is queued."""
        if self.gaps is not None:
            self.gaps.end()

    def _host(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.device_logits else logits.cpu()

    def _decode(self, plan: StepPlan) -> StepLogits | None:
        """A decode-only step through the graphs; None when there are none or the step is not one for them."""
        logits = self.graphs.run(plan) if self.graphs is not None else None
        if logits is None:
            return None
        return StepLogits(logits=self._host(logits.float()), prompt_logprobs=tuple([] for _ in plan.rows))

    def _packed(self, plan: StepPlan) -> StepLogits:
        """Any step, eagerly, as one packed sequence."""
        packed = pack(plan, self.cache, self.device, self._cuda_kernel, self.lora)
        with self._adapters(packed.lora):
            out = self.model(
                input_ids=packed.input_ids,
                position_ids=packed.position_ids,
                use_cache=False,
                logits_to_keep=packed.keep,
                paged_step=packed.step,
            )
        kept = out.logits[0].float()
        logits = self._host(kept[: packed.num_sample])
        prompt_logprobs = self._prompt_logprobs(plan, kept[packed.num_sample :], packed.targets)
        return StepLogits(logits=logits, prompt_logprobs=prompt_logprobs)

    def _adapters(self, batch: LoraBatch | None) -> AbstractContextManager[None]:
        return nullcontext() if self.lora is None else self.lora.active(batch)

    @staticmethod
    def _prompt_logprobs(
        plan: StepPlan, logits: torch.Tensor, targets: torch.Tensor
    ) -> tuple[list[float], ...]:
        if not targets.numel():
            return tuple([] for _ in plan.rows)
        values = logits.log_softmax(dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        out: list[list[float]] = []
        for row in plan.rows:
            n = len(row.logprob_targets)
            out.append(values[:n])
            values = values[n:]
        return tuple(out)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The LoRA adapters installed (rows may name them)."""
        return () if self.lora is None else self.lora.names

    @property
    def alone(self) -> bool:
        """Whether this runner has no tensor-parallel peers."""
        return self._broadcast is None

    def shutdown(self) -> None:
        """Tell the other ranks to leave their loop."""
        if self._broadcast is not None:
            self._broadcast(None)
