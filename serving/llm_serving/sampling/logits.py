"""Batched logits processors. Each acts only on the rows that ask for it, alike in any batch.

Penalties work on the whole vocabulary; sampling warpers on each row's top candidates (sorted), which is
equivalent and much cheaper than sorting the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llm_serving.sampling.params import FrequencyRule, SamplingParams

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


def _frequency_counted(row: RowContext) -> tuple[list[int], int]:
    """The tokens a row's frequency penalty counts, and what each count is divided by (`FrequencyRule`)."""
    if row.params.frequency_rule is FrequencyRule.TGI:
        tokens = [*row.prompt_ids, *row.output_ids]
        return tokens, max(1, len(tokens))
    return list(row.output_ids), 1


def frequency_penalty(logits: torch.Tensor, rows: Sequence[RowContext]) -> None:
    """Subtract `penalty * count / divisor` from each token's logit, as the row's `FrequencyRule` says."""
    idx = _select(rows, lambda p: p.frequency_penalty != 0.0)
    if not idx:
        return
    counted = [_frequency_counted(rows[i]) for i in idx]
    ids, mask = _pad([tokens for tokens, _ in counted])
    counts = torch.zeros((len(idx), logits.shape[-1]), dtype=logits.dtype)
    counts.scatter_add_(1, ids, mask.to(logits.dtype))
    counts /= torch.tensor([divisor for _, divisor in counted], dtype=logits.dtype).unsqueeze(1)
    penalty = torch.tensor([rows[i].params.frequency_penalty for i in idx], dtype=logits.dtype).unsqueeze(1)
    logits[idx] = logits[idx] - counts * penalty


def penalize(logits: torch.Tensor, rows: Sequence[RowContext]) -> torch.Tensor:
    """Watermark, repetition and frequency penalties on float32 `[B, V]` logits (a copy), in TGI's order.

    An extreme penalty (any positive float32 is valid) can push a logit to +infinity; it is kept at the
    largest float32 instead, so the row stays a distribution."""
    out = logits.float().clone()
    for step in (watermark, repetition_penalty, frequency_penalty):
        step(out, rows)
    return out.clamp_(max=torch.finfo(out.dtype).max)


def candidates(scores: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, then the most likely tokens in descending order: `(values, token ids)`, both `[B, K]`;
    values are shifted so that each row's best is 0.

    K is the largest `top_k` (the whole vocabulary if a row has none), so the warpers below work on K columns.
    """
    temps = torch.tensor([p.temperature for p in params], dtype=scores.dtype).unsqueeze(1)
    # Shifted so that the best score is 0 first: the same distribution, and finite for any temperature > 0.
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / temps
    vocab = scores.shape[-1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    width = max(ks)
    if width < vocab:
        values, ids = scores.topk(width, dim=-1)
    else:
        values, ids = scores.sort(dim=-1, descending=True)
    rank = torch.arange(width).unsqueeze(0)
    values = values.masked_fill(rank >= torch.tensor(ks).unsqueeze(1), float("-inf"))
    return values, ids


def top_p(values: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Nucleus on descending candidates: keep tokens until the mass before them reaches `top_p`."""
    mass = torch.tensor([p.top_p for p in params], dtype=values.dtype).unsqueeze(1)
    probs = values.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    remove = before >= mass
    remove[:, 0] = False
    return values.masked_fill(remove, float("-inf"))


def typical_p(values: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Typical sampling: keep tokens whose surprisal is closest to the entropy, up to `typical_p` mass."""
    mass = torch.tensor([p.typical_p for p in params], dtype=values.dtype).unsqueeze(1)
    logp = values.log_softmax(dim=-1)
    entropy = -(logp.exp() * logp).nansum(dim=-1, keepdim=True)
    shifted = (-logp - entropy).abs().nan_to_num(nan=float("inf"))
    sorted_shifted, order = shifted.sort(dim=-1)
    cum = logp.gather(1, order).exp().cumsum(dim=-1)
    last = (cum < mass).sum(dim=1, keepdim=True).clamp(max=values.shape[-1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(1, last)
    return values.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))


def warp(values: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Apply top-p and typical-p to the rows that ask for them (candidates are already top-k limited)."""
    idx = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if idx:
        values[idx] = top_p(values[idx], [params[i] for i in idx])
    idx = [i for i, p in enumerate(params) if p.typical_p < 1.0]
    if idx:
        values[idx] = typical_p(values[idx], [params[i] for i in idx])
    return values
