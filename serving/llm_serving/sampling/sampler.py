"""Choose each row's next token: greedy or sampled with the row's own seeded generator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llm_serving.sampling.logits import RowContext, process


@dataclass(frozen=True)
class Choice:
    """The chosen token, its log-probability under the processed distribution, and the top alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator for a sampled request (seeds are u64; torch takes them as is)."""
    return None if seed is None else torch.Generator().manual_seed(seed)


def choose(
    logits: torch.Tensor, rows: Sequence[RowContext], generators: Sequence[torch.Generator | None]
) -> list[Choice]:
    """Process the logits of every row and pick one token per row."""
    scores = process(logits, rows)
    logprobs = scores.log_softmax(dim=-1)
    greedy = scores.argmax(dim=-1).tolist()
    max_top = max((r.params.top_n_tokens for r in rows), default=0)
    top_vals, top_ids = logprobs.topk(max_top, dim=-1) if max_top else (None, None)
    choices: list[Choice] = []
    for i, row in enumerate(rows):
        token = int(greedy[i])
        if row.params.do_sample:
            probs = logprobs[i].exp()
            token = int(torch.multinomial(probs, 1, generator=generators[i]).item())
        top: tuple[tuple[int, float], ...] = ()
        n = row.params.top_n_tokens
        if n and top_ids is not None and top_vals is not None:
            top = tuple(zip(top_ids[i, :n].tolist(), top_vals[i, :n].tolist(), strict=True))
        choices.append(Choice(token=token, logprob=float(logprobs[i, token]), top=top))
    return choices
