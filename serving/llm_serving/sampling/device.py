"""Batched sampling on the model's device: the semantics of `sampling.sampler.choose` (TGI's), with the
logits never leaving the device and one small copy to the host per step.

How to use it (one `DeviceSampler` per engine, on the device of the logits):

- `DeviceSampler(slots, vocab, device)` keeps, per slot, the token counts of one request on the device: two
  int32 `[slots, vocab]` tensors (prompt + output, output only), `8 * slots * vocab` bytes in all; allocate it
  before the KV cache is sized. `slots` is the most requests sampled at once (the scheduler's
  `max_batch_size`).
- Slot lifecycle: `admit(slot, params, prompt_ids, output_ids)` when a request starts running (again: after
  a preemption pass the tokens it has generated so far); `release(slot)` when it leaves the running set
  (finished, cancelled, failed, preempted). Every token `launch` chooses is counted in its slot by `append`
  on the device; a caller that chooses a slot's token some other way calls `append` itself.
- `launch(logits, slots, masks)` samples float `[B, V]` device logits, row `i` with the request admitted in
  `slots[i]` (`masks`: `RowMasks` of the constrained rows, indexed by row of this call) and returns a
  `PendingChoices` at once: `tokens` is the chosen ids on the device (`[B]` int64, usable as the next step's
  input); `result()` waits for the one device-to-host copy (a pinned buffer and an event on CUDA, so later
  work on the stream is not waited for) and gives the `Choice`s. `sample` is both in one.
- `DeviceSampler.supports(params)`: TGI's watermark rows stay on the eager CPU sampler. `sample_rows` does the
  split for a step's sampled rows: rows with a slot go through the device sampler, the others (slot None)
  through `choose` on a CPU copy of their logits with their generators; masks follow their rows.

What it computes, per row, in one batched path (no per-row loop over vocabulary-sized tensors): the rows'
parameters as one int64 `[B, 13]` tensor built per step from host-side slot records (one host-to-device
copy); repetition then frequency penalties from the slot's counts; the structured-output mask as a device
bool tensor; greedy rows take the argmax of the log-softmax of that; sampled rows (do_sample) add
temperature, top-k, top-p, typical-p in TGI's order over candidates sorted by (score descending, id
ascending), and draw by inverse CDF with a uniform keyed on (seed, number of tokens generated before):
`splitmix64(splitmix64(seed) + position)` in int64 tensor ops. The uniforms are the same bits alone, in any
batch, on CPU or CUDA, and so is the token for the same logits row (barring a draw within float rounding
of a CDF step, where a device's cumulative sum may round otherwise); they are not `choose`'s generator
draws, so sampled tokens equal `choose`'s in distribution, not one by one. Logprobs are of the processed
distribution; top-n lists the n most likely and every token tied with the n-th (TGI's rule, as
`sampler._top`; ties by lowest id), copied from a window of `max(top_n) + TIE_SLACK` entries (a second
copy only for a row with more ties than that).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llm_serving.sampling.logits import RowContext
from llm_serving.sampling.masks import RowMasks
from llm_serving.sampling.params import FrequencyRule, SamplingParams
from llm_serving.sampling.sampler import Choice, choose

TIE_SLACK = 8
"""Top-n entries copied to the host beyond a step's largest `top_n_tokens`, for tokens tied with the n-th."""

_U64 = (1 << 64) - 1


def _int64(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    value &= _U64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)

# Columns of the per-step row table: floats are stored as their float32 bits.
_SLOT, _TEMPERATURE, _TOP_P, _TYPICAL_P, _REPETITION, _FREQUENCY = range(6)
_TOP_K, _SAMPLE, _OUTPUT_ONLY, _SEED, _TOP_N, _POSITION, _LENGTH = range(6, 13)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's step (Vigna's constants) on int64 tensors, wrapping: the same bits on any device."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One float32 in [0, 1) per (seed, position) pair of int64 tensors: the top 24 bits of
    `splitmix64(splitmix64(seed) + position)` (float32's resolution, as `torch.rand`)."""
    return _shr(splitmix64(splitmix64(seeds) + positions), 40).to(torch.float32) * 2.0**-24


def top_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of the `k` largest of each row of float32 `[B, V]` `x`, descending, ties by lowest id: one
    topk over int64 keys (order-preserving float bits, then the complement of the id), which are unique."""
    bits = (x + 0.0).view(torch.int32)  # + 0.0: -0.0 and 0.0 are one value
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    vocab = x.shape[-1]
    low = (vocab - 1) - torch.arange(vocab, device=x.device)
    keys = (ordered.to(torch.int64) << 32) | low
    return (vocab - 1) - (keys.topk(k, dim=-1).values & 0xFFFFFFFF)


def candidates(
    scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits.candidates` with per-row tensors: `(values, ids)`, `[B, width]`, sorted by value descending
    then id ascending; values are `(score - best) / temperature`, -inf from each row's `top_k` on."""
    scaled = (scores - scores.amax(dim=-1, keepdim=True)) / temperature.unsqueeze(1)
    if width >= scaled.shape[-1]:
        values, ids = scaled.sort(dim=-1, descending=True, stable=True)
    else:
        ids = top_ids(scaled, width)
        values = scaled.gather(1, ids)
    rank = torch.arange(values.shape[-1], device=values.device)
    return values.masked_fill(rank >= top_k.unsqueeze(1), float("-inf")), ids


def top_p(values: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """`logits.top_p` on the rows whose `mass` is below 1 (the others are returned as they are)."""
    probs = values.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    remove = (before >= mass.unsqueeze(1)) & (mass < 1.0).unsqueeze(1)
    remove[:, 0] = False
    return values.masked_fill(remove, float("-inf"))


def typical_p(values: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """`logits.typical_p` on the rows whose `mass` is below 1 (the others are returned as they are)."""
    logp = values.log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).nansum(dim=-1, keepdim=True)
    shifted = (-logp - entropy).abs().nan_to_num(nan=float("inf"))
    sorted_shifted, order = shifted.sort(dim=-1, stable=True)
    cum = logp.gather(1, order).exp().cumsum(dim=-1)
    last = (cum < mass.unsqueeze(1)).sum(dim=1, keepdim=True).clamp(max=values.shape[-1] - 1)
    remove_sorted = (sorted_shifted > sorted_shifted.gather(1, last)) & (mass < 1.0).unsqueeze(1)
    return values.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))


def draw(values: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: the column of each row of warped `values` that uniform `u` falls in, `[B, 1]`.

    The weights are `exp(value - row max)` (the max is exact in any reduction order); a column removed by a
    warper (-inf) is never chosen."""
    weights = (values - values.amax(dim=-1, keepdim=True)).exp()
    cdf = weights.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, u.unsqueeze(1) * cdf[:, -1:], right=True)
    columns = torch.arange(values.shape[-1], device=values.device)
    last = torch.where(weights > 0, columns, -1).amax(dim=-1, keepdim=True)
    return torch.minimum(pick, last)


def _window(
    logprobs: torch.Tensor, ids: torch.Tensor | None, n: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `width` most likely entries of each row (`-inf`/0 padded), as `(logprobs, ids, keep)`, ties by
    lowest column (lowest id: candidates are sorted so); `keep` is how many tokens TGI lists for a row's `n`
    (its n most likely and those tied with the n-th; finite only)."""
    k = min(width, logprobs.shape[-1])
    columns = top_ids(logprobs, k)
    values = logprobs.gather(1, columns)
    top = columns if ids is None else ids.gather(1, columns)
    nth = values.gather(1, (n - 1).clamp(0, k - 1).unsqueeze(1))
    keep = ((logprobs >= nth) & logprobs.isfinite()).sum(dim=-1)
    keep = torch.where(n > 0, keep, 0)
    if k < width:
        values = torch.nn.functional.pad(values, (0, width - k), value=float("-inf"))
        top = torch.nn.functional.pad(top, (0, width - k))
    return values, top, keep


@dataclass(frozen=True)
class Distributions:
    """What a step's rows choose from, on the device."""

    logprobs: torch.Tensor
    """`[B, V]`: log-softmax of the penalized, masked scores; a greedy row takes its argmax."""
    warped: torch.Tensor | None
    """`[B, W]`: log-probs of the sorted, warped candidates a sampled row draws from (None: no row samples;
    a greedy row's own is its argmax alone)."""
    ids: torch.Tensor | None
    """`[B, W]`: the token ids of those candidates."""


@dataclass(frozen=True)
class _Slot:
    params: SamplingParams
    row: tuple[int, ...]  # the table columns from _TEMPERATURE to _TOP_N
    generated: int
    length: int


class PendingChoices:
    """The choices of one `launch`: `tokens` on the device now, `result()` on the host once copied."""

    def __init__(
        self,
        tokens: torch.Tensor,
        host: torch.Tensor,
        event: torch.cuda.Event | None,
        overflow: Distributions | None,
        sampled: Sequence[bool],
    ) -> None:
        self.tokens = tokens
        self._host = host
        self._event = event
        self._overflow = overflow
        self._sampled = sampled

    def result(self) -> list[Choice]:
        """The rows' choices, in row order (waits for the copy to the host)."""
        if self._event is not None:
            self._event.synchronize()
        rows = self._host.tolist()
        width = (self._host.shape[1] - 3) // 2
        choices = []
        for i, row in enumerate(rows):
            keep = int(row[2])
            if keep > width:
                top = self._exact_top(i, keep)
            else:
                ids = row[3 + width : 3 + width + keep]
                top = tuple((int(t), lp) for t, lp in zip(ids, row[3 : 3 + keep], strict=True))
            choices.append(Choice(token=int(row[0]), logprob=row[1], top=top))
        return choices

    def _exact_top(self, row: int, keep: int) -> tuple[tuple[int, float], ...]:
        """A row's top tokens when more are tied with its n-th than the window holds (a second copy)."""
        assert self._overflow is not None
        dist = self._overflow
        if self._sampled[row] and dist.warped is not None and dist.ids is not None:
            logprobs, ids = dist.warped[row : row + 1], dist.ids[row]
        else:
            logprobs, ids = dist.logprobs[row : row + 1], None
        columns = top_ids(logprobs, keep)[0]
        tokens = columns if ids is None else ids[columns]
        return tuple(zip(tokens.tolist(), logprobs[0, columns].tolist(), strict=True))


class DeviceSampler:
    """Per-slot token counts and parameters of the running requests, and the batched sampler over them."""

    def __init__(self, slots: int, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.device = device
        with torch.inference_mode():
            self._seen = torch.zeros((slots, vocab), dtype=torch.int32, device=device)
            self._output = torch.zeros((slots, vocab), dtype=torch.int32, device=device)
            self._bit = torch.arange(32, dtype=torch.int32, device=device)
        self._slots: list[_Slot | None] = [None] * slots

    @staticmethod
    def supports(params: SamplingParams) -> bool:
        """Whether a request's rows can be sampled here (TGI's watermark stays on the eager sampler)."""
        return not params.watermark

    def _to_device(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    @torch.inference_mode()
    def admit(
        self, slot: int, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int] = ()
    ) -> None:
        """Give `slot` to a request: its parameters, and counts of its prompt and output tokens so far."""
        if not self.supports(params):
            raise ValueError("watermarked requests are sampled by the eager sampler")
        self._seen[slot].zero_()
        self._output[slot].zero_()
        tokens = [*prompt_ids, *output_ids]
        if tokens:
            ids = self._to_device(tokens)
            ones = torch.ones_like(ids, dtype=torch.int32)
            self._seen[slot].scatter_add_(0, ids, ones)
            if output_ids:
                self._output[slot].scatter_add_(0, ids[len(prompt_ids) :], ones[len(prompt_ids) :])
        self._slots[slot] = _Slot(params, self._row(params), generated=len(output_ids), length=len(tokens))

    def release(self, slot: int) -> None:
        """The slot's request left the running set (its counts are cleared by the next `admit`)."""
        self._slots[slot] = None

    def _row(self, params: SamplingParams) -> tuple[int, ...]:
        """A request's static table columns; a greedy row samples as temperature 1, top-k 1, no warpers."""
        sample = params.do_sample
        floats = [
            params.temperature if sample else 1.0,
            params.top_p if sample else 1.0,
            params.typical_p if sample else 1.0,
            params.repetition_penalty,
            params.frequency_penalty,
        ]
        bits = torch.tensor(floats, dtype=torch.float32).view(torch.int32).tolist()
        top_k = (params.top_k if 0 < params.top_k < self.vocab else self.vocab) if sample else 1
        seed = random.getrandbits(64) if params.seed is None else params.seed
        output_only = params.frequency_rule is FrequencyRule.OPENAI
        return (*bits, top_k, int(sample), int(output_only), _int64(seed), params.top_n_tokens)

    def _slot(self, slot: int) -> _Slot:
        state = self._slots[slot]
        if state is None:
            raise KeyError(f"slot {slot} has no request")
        return state

    @torch.inference_mode()
    def append(self, slots: Sequence[int], tokens: torch.Tensor) -> None:
        """Count one more token (`tokens[i]`, on the device) in each of `slots`."""
        self._count(slots, self._to_device(list(slots)), tokens)

    def _count(self, slots: Sequence[int], index: torch.Tensor, tokens: torch.Tensor) -> None:
        for slot in slots:
            state = self._slot(slot)
            self._slots[slot] = _Slot(state.params, state.row, state.generated + 1, state.length + 1)
        ones = torch.ones_like(tokens, dtype=torch.int32)
        self._seen.index_put_((index, tokens), ones, accumulate=True)
        self._output.index_put_((index, tokens), ones, accumulate=True)

    def _table(self, slots: Sequence[int]) -> tuple[torch.Tensor, list[SamplingParams]]:
        """The step's `[B, 13]` row table on the device (one copy), and the rows' parameters."""
        states = [self._slot(s) for s in slots]
        rows = [[s, *st.row, st.generated, st.length] for s, st in zip(slots, states, strict=True)]
        return self._to_device(rows), [st.params for st in states]

    @torch.inference_mode()
    def distributions(
        self, logits: torch.Tensor, slots: Sequence[int], masks: RowMasks | None = None
    ) -> Distributions:
        """The processed distributions of float `[B, V]` `logits`, row `i` with the request in `slots[i]`."""
        table, params = self._table(slots)
        return self._distributions(logits, table, params, masks)

    def _distributions(
        self,
        logits: torch.Tensor,
        table: torch.Tensor,
        params: Sequence[SamplingParams],
        masks: RowMasks | None,
    ) -> Distributions:
        if logits.shape[-1] != self.vocab:
            raise ValueError(f"logits of {logits.shape[-1]} tokens for a sampler of {self.vocab}")
        floats = table[:, _TEMPERATURE : _FREQUENCY + 1].to(torch.int32).view(torch.float32)
        scores = logits.float()
        repetition = any(p.repetition_penalty != 1.0 for p in params)
        frequency = any(p.frequency_penalty != 0.0 for p in params)
        if repetition or frequency:
            slots = table[:, _SLOT]
            seen = self._seen[slots]
            if repetition:
                penalty = floats[:, _REPETITION - 1].unsqueeze(1)
                scores = torch.where(
                    seen > 0, torch.where(scores < 0, scores * penalty, scores / penalty), scores
                )
            if frequency:
                output_only = table[:, _OUTPUT_ONLY].bool()
                counts = torch.where(output_only.unsqueeze(1), self._output[slots], seen).float()
                divisor = torch.where(output_only, 1, table[:, _LENGTH].clamp(min=1)).float()
                scores = scores - counts / divisor.unsqueeze(1) * floats[:, _FREQUENCY - 1].unsqueeze(1)
        scores = scores.clamp(max=torch.finfo(scores.dtype).max)  # a copy, as `logits.penalize`
        if masks is not None:
            rows = self._to_device(list(masks.rows))
            scores[rows] = scores[rows].masked_fill(~self._allowed(masks), float("-inf"))
        logprobs = scores.log_softmax(dim=-1)
        sampled = [p for p in params if p.do_sample]
        if not sampled:
            return Distributions(logprobs, None, None)
        width = max(p.top_k if 0 < p.top_k < self.vocab else self.vocab for p in sampled)
        values, ids = candidates(scores, floats[:, _TEMPERATURE - 1], table[:, _TOP_K], width)
        if any(p.top_p < 1.0 for p in sampled):
            values = top_p(values, floats[:, _TOP_P - 1])
        if any(p.typical_p < 1.0 for p in sampled):
            values = typical_p(values, floats[:, _TYPICAL_P - 1])
        return Distributions(logprobs, values.log_softmax(dim=-1), ids)

    def _allowed(self, masks: RowMasks) -> torch.Tensor:
        """`RowMasks.allowed` unpacked on the device: `[len(rows), vocab]` bools."""
        bits = masks.bits.to(self.device, non_blocking=True)
        unpacked = ((bits.unsqueeze(-1) >> self._bit) & 1).flatten(1).bool()
        if unpacked.shape[1] >= self.vocab:
            return unpacked[:, : self.vocab]
        return torch.nn.functional.pad(unpacked, (0, self.vocab - unpacked.shape[1]), value=False)

    @torch.inference_mode()
    def launch(
        self, logits: torch.Tensor, slots: Sequence[int], masks: RowMasks | None = None
    ) -> PendingChoices:
        """Choose a token for each row of float `[B, V]` device `logits` (row `i`: the request in `slots[i]`;
        `masks` indexed by row of this call), count it in its slot, and start the copy to the host."""
        table, params = self._table(slots)
        dist = self._distributions(logits, table, params, masks)
        greedy = dist.logprobs.argmax(dim=-1, keepdim=True)
        token, logprob = greedy, dist.logprobs.gather(1, greedy)
        sample = table[:, _SAMPLE].bool().unsqueeze(1)
        if dist.warped is not None and dist.ids is not None:
            pick = draw(dist.warped, uniforms(table[:, _SEED], table[:, _POSITION]))
            token = torch.where(sample, dist.ids.gather(1, pick), token)
            logprob = torch.where(sample, dist.warped.gather(1, pick), logprob)
        parts = [token.double(), logprob.double()]
        n_max = max(p.top_n_tokens for p in params)
        if n_max:
            parts.extend(self._top(dist, table, params, n_max + TIE_SLACK))
        else:
            parts.append(torch.zeros_like(parts[0]))
        packed = torch.cat(parts, dim=1)
        tokens = token.squeeze(1)
        self._count(slots, table[:, _SLOT], tokens)
        host, event = packed, None
        if self.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        return PendingChoices(tokens, host, event, dist if n_max else None, [p.do_sample for p in params])

    def _top(
        self, dist: Distributions, table: torch.Tensor, params: Sequence[SamplingParams], width: int
    ) -> list[torch.Tensor]:
        """`[keep, logprobs (width), ids (width)]` float64 columns from each row's processed distribution."""
        n = table[:, _TOP_N]
        values, ids, keep = _window(dist.logprobs, None, n, width)
        if dist.warped is not None and any(p.do_sample and p.top_n_tokens for p in params):
            s_values, s_ids, s_keep = _window(dist.warped, dist.ids, n, width)
            sample = table[:, _SAMPLE].bool()
            values = torch.where(sample.unsqueeze(1), s_values, values)
            ids = torch.where(sample.unsqueeze(1), s_ids, ids)
            keep = torch.where(sample, s_keep, keep)
        return [keep.double().unsqueeze(1), values.double(), ids.double()]

    def sample(
        self, logits: torch.Tensor, slots: Sequence[int], masks: RowMasks | None = None
    ) -> list[Choice]:
        """`launch(...).result()`."""
        return self.launch(logits, slots, masks).result()


def select_masks(masks: RowMasks | None, rows: Sequence[int]) -> RowMasks | None:
    """The masks of `rows` (indices of `masks`' rows), renumbered to their place in `rows`."""
    if masks is None:
        return None
    place = {r: j for j, r in enumerate(rows)}
    picked = [k for k, r in enumerate(masks.rows) if r in place]
    if not picked:
        return None
    return RowMasks(rows=tuple(place[masks.rows[k]] for k in picked), bits=masks.bits[picked])


def sample_rows(
    sampler: DeviceSampler,
    logits: torch.Tensor,
    rows: Sequence[RowContext],
    slots: Sequence[int | None],
    generators: Sequence[torch.Generator | None],
    masks: RowMasks | None = None,
) -> list[Choice]:
    """A step's sampled rows: those with a slot on the device sampler, the others (watermark: slot None)
    through `choose` on a CPU copy of their logits with their `generators`. `masks` index `rows`."""
    on_device = [i for i, s in enumerate(slots) if s is not None]
    eager = [i for i, s in enumerate(slots) if s is None]
    choices: dict[int, Choice] = {}
    if on_device:
        part = logits if not eager else logits[torch.tensor(on_device, device=logits.device)]
        device_slots = [s for s in slots if s is not None]
        picked = sampler.sample(part, device_slots, select_masks(masks, on_device))
        choices.update(zip(on_device, picked, strict=True))
    if eager:
        index = torch.tensor(eager, device=logits.device)
        picked = choose(
            logits[index].float().cpu(),
            [rows[i] for i in eager],
            [generators[i] for i in eager],
            select_masks(masks, eager),
        )
        choices.update(zip(eager, picked, strict=True))
    return [choices[i] for i in range(len(rows))]
