"""Batched logits processors: each acts only on the rows that ask for it, row by row identical to a batch of one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llm_serving.sampling.params import SamplingParams

WATERMARK_GAMMA = 0.5
WATERMARK_DELTA = 2.0
WATERMARK_HASH_KEY = 15485863


@dataclass(frozen=True)
class RowContext:
    """What the processors need to know about one row: its parameters and its tokens so far."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]


def _pad(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into `[B, L]` ids (padded with each row's first id) and a validity mask."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            ids[i, len(r) :] = r[0]
            mask[i, : len(r)] = True
    return ids, mask


def _select(rows: Sequence[RowContext], pred: object) -> list[int]:
    return [i for i, r in enumerate(rows) if pred(r.params)]  # type: ignore[operator]


def watermark(logits: torch.Tensor, rows: Sequence[RowContext]) -> None:
    """Kirchenbauer et al.: favour a green list seeded by the previous token."""
    vocab = logits.shape[-1]
    for i in _select(rows, lambda p: p.watermark):
        tokens = [*rows[i].prompt_ids, *rows[i].output_ids]
        rng = torch.Generator().manual_seed(WATERMARK_HASH_KEY * tokens[-1])
        green = torch.randperm(vocab, generator=rng)[: int(WATERMARK_GAMMA * vocab)]
        logits[i, green] += WATERMARK_DELTA


def repetition_penalty(logits: torch.Tensor, rows: Sequence[RowContext]) -> None:
    """CTRL-style penalty over prompt and output tokens: divide positive logits, multiply negative ones."""
    idx = _select(rows, lambda p: p.repetition_penalty != 1.0)
    if not idx:
        return
    ids, _ = _pad([[*rows[i].prompt_ids, *rows[i].output_ids] for i in idx])
    penalty = torch.tensor([rows[i].params.repetition_penalty for i in idx], dtype=logits.dtype).unsqueeze(1)
    sub = logits[idx]
    score = sub.gather(1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    logits[idx] = sub.scatter(1, ids, score)


def frequency_penalty(logits: torch.Tensor, rows: Sequence[RowContext]) -> None:
    """OpenAI-style: subtract `penalty * count` for each token already generated."""
    idx = _select(rows, lambda p: p.frequency_penalty != 0.0)
    if not idx:
        return
    ids, mask = _pad([list(rows[i].output_ids) for i in idx])
    counts = torch.zeros((len(idx), logits.shape[-1]), dtype=logits.dtype)
    counts.scatter_add_(1, ids, mask.to(logits.dtype))
    penalty = torch.tensor([rows[i].params.frequency_penalty for i in idx], dtype=logits.dtype).unsqueeze(1)
    logits[idx] = logits[idx] - penalty * counts


def temperature(logits: torch.Tensor, rows: Sequence[RowContext]) -> None:
    idx = _select(rows, lambda p: p.do_sample and p.temperature != 1.0)
    if idx:
        t = torch.tensor([rows[i].params.temperature for i in idx], dtype=logits.dtype).unsqueeze(1)
        logits[idx] = logits[idx] / t


def top_k(logits: torch.Tensor, rows: Sequence[RowContext]) -> None:
    idx = _select(rows, lambda p: p.do_sample and 0 < p.top_k < logits.shape[-1])
    if not idx:
        return
    sub = logits[idx]
    ks = torch.tensor([rows[i].params.top_k for i in idx], dtype=torch.long).unsqueeze(1)
    kth = sub.sort(dim=-1, descending=True).values.gather(1, ks - 1)
    logits[idx] = sub.masked_fill(sub < kth, float("-inf"))


def top_p(logits: torch.Tensor, rows: Sequence[RowContext]) -> None:
    """Nucleus: keep the smallest set of most likely tokens whose mass reaches `top_p`."""
    idx = _select(rows, lambda p: p.do_sample and p.top_p < 1.0)
    if not idx:
        return
    sub = logits[idx]
    mass = torch.tensor([rows[i].params.top_p for i in idx], dtype=logits.dtype).unsqueeze(1)
    sorted_logits, order = sub.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - mass)
    remove[:, -1] = False
    logits[idx] = sub.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def typical_p(logits: torch.Tensor, rows: Sequence[RowContext]) -> None:
    """Locally typical sampling: keep tokens whose surprisal is closest to the entropy, up to `typical_p` mass."""
    idx = _select(rows, lambda p: p.do_sample and p.typical_p < 1.0)
    if not idx:
        return
    sub = logits[idx]
    mass = torch.tensor([rows[i].params.typical_p for i in idx], dtype=logits.dtype).unsqueeze(1)
    logp = sub.log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).nansum(dim=-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shifted, order = shifted.sort(dim=-1)
    cum = sub.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass).sum(dim=1, keepdim=True).clamp(max=sub.shape[-1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(1, last)
    logits[idx] = sub.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))


def process(logits: torch.Tensor, rows: Sequence[RowContext]) -> torch.Tensor:
    """Run TGI's processor chain on float32 `[B, V]` logits: penalties first, then the sampling warpers."""
    out = logits.float().clone()
    for step in (watermark, repetition_penalty, frequency_penalty, temperature, top_k, top_p, typical_p):
        step(out, rows)
    return out
