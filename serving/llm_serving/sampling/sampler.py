"""Choose each row's next token: greedy, or sampled with the row's own seeded generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llm_serving.sampling.logits import RowContext, candidates, penalize, warp
from llm_serving.sampling.masks import RowMasks


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
    """TGI's top tokens of one row, from its descending `logprobs` (the distribution the token is chosen
    from): the `n` most likely and any tied with the n-th; a token a warper removed (-inf) is never listed."""
    if n == 0:
        return ()
    nth = logprobs[min(n, logprobs.shape[-1]) - 1]
    keep = int(((logprobs >= nth) & logprobs.isfinite()).sum())
    return tuple(
        (int(i), float(lp)) for i, lp in zip(ids[:keep].tolist(), logprobs[:keep].tolist(), strict=True)
    )


def _descending(logprobs: torch.Tensor, ns: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens of each row, sorted, as many as row `i` needs for `ns[i]` top tokens and
    their ties (at least one: the greedy choice)."""
    k = min(max(1, *ns), logprobs.shape[-1])
    values, ids = logprobs.topk(k, dim=-1)
    if not any(ns):
        return values, ids
    nth = values.gather(1, (torch.tensor(ns) - 1).clamp(0, k - 1).unsqueeze(1))
    nth = nth.clamp(min=torch.finfo(logprobs.dtype).min)
    width = int((logprobs >= nth).sum(dim=-1).max())
    return logprobs.topk(width, dim=-1) if width > values.shape[-1] else (values, ids)


def choose(
    logits: torch.Tensor,
    rows: Sequence[RowContext],
    generators: Sequence[torch.Generator | None],
    masks: RowMasks | None = None,
) -> list[Choice]:
    """Process the logits of every row and pick one token per row. A masked row (structured output) can only
    get an allowed token; its log-probabilities and top tokens are those of the masked distribution."""
    scores = penalize(logits, rows)
    if masks is not None:
        masks.apply(scores)
    choices: dict[int, Choice] = {}
    greedy = [i for i, r in enumerate(rows) if not r.params.do_sample]
    if greedy:
        logprobs = scores[greedy].log_softmax(dim=-1)
        ns = [rows[i].params.top_n_tokens for i in greedy]
        top_vals, top_ids = _descending(logprobs, ns)
        for j, i in enumerate(greedy):
            top = _top(top_ids[j], top_vals[j], ns[j])
            choices[i] = Choice(token=int(top_ids[j, 0]), logprob=float(top_vals[j, 0]), top=top)
    sampled = [i for i, r in enumerate(rows) if r.params.do_sample]
    if sampled:
        params = [rows[i].params for i in sampled]
        values, ids = candidates(scores[sampled], params)
        logprobs = warp(values, params).log_softmax(dim=-1)
        cumulative = logprobs.exp().cumsum(dim=-1)
        ns = [p.top_n_tokens for p in params]
        # Typical-p can remove likelier candidates than the ones it keeps: sort again for the top tokens.
        top_vals, columns = _descending(logprobs, ns)
        top_ids = ids.gather(1, columns)
        for j, i in enumerate(sampled):
            u = torch.rand((), generator=generators[i]) * cumulative[j, -1]
            pick = min(int(torch.searchsorted(cumulative[j], u, right=True)), cumulative.shape[-1] - 1)
            top = _top(top_ids[j], top_vals[j], ns[j])
            choices[i] = Choice(token=int(ids[j, pick]), logprob=float(logprobs[j, pick]), top=top)
    return [choices[i] for i in range(len(rows))]
