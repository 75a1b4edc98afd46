"""Choose each row's next token: greedy, or sampled with the row's own seeded generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llm_serving.sampling.logits import RowContext, candidates, penalize, warp


@dataclass(frozen=True)
class Choice:
    """The chosen token, its log-probability under the processed distribution, and the top alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator for a sampled request."""
    return None if seed is None else torch.Generator().manual_seed(seed)


def _top(ids: torch.Tensor, logprobs: torch.Tensor, n: int) -> tuple[tuple[int, float], ...]:
    """The first `n` alternatives; a token a warper removed (-inf) gets the lowest finite float32, so that
    the answer stays valid JSON."""
    finite = logprobs[:n].clamp(min=torch.finfo(logprobs.dtype).min)
    return tuple((int(i), float(lp)) for i, lp in zip(ids[:n].tolist(), finite.tolist(), strict=True))


def choose(
    logits: torch.Tensor, rows: Sequence[RowContext], generators: Sequence[torch.Generator | None]
) -> list[Choice]:
    """Process the logits of every row and pick one token per row."""
    scores = penalize(logits, rows)
    choices: dict[int, Choice] = {}
    greedy = [i for i, r in enumerate(rows) if not r.params.do_sample]
    if greedy:
        logprobs = scores[greedy].log_softmax(dim=-1)
        max_n = max(rows[i].params.top_n_tokens for i in greedy)
        top_vals, top_ids = logprobs.topk(max(1, max_n), dim=-1)
        for j, i in enumerate(greedy):
            token = int(top_ids[j, 0])
            top = _top(top_ids[j], top_vals[j], rows[i].params.top_n_tokens)
            choices[i] = Choice(token=token, logprob=float(top_vals[j, 0]), top=top)
    sampled = [i for i, r in enumerate(rows) if r.params.do_sample]
    if sampled:
        params = [rows[i].params for i in sampled]
        values, ids = candidates(scores[sampled], params)
        logprobs = warp(values, params).log_softmax(dim=-1)
        cumulative = logprobs.exp().cumsum(dim=-1)
        for j, i in enumerate(sampled):
            u = torch.rand((), generator=generators[i]) * cumulative[j, -1]
            pick = min(int(torch.searchsorted(cumulative[j], u, right=True)), cumulative.shape[-1] - 1)
            top = _top(ids[j], logprobs[j], rows[i].params.top_n_tokens)
            choices[i] = Choice(token=int(ids[j, pick]), logprob=float(logprobs[j, pick]), top=top)
    return [choices[i] for i in range(len(rows))]
