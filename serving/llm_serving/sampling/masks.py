"""Per-row token masks for constrained requests inside the batched sampler (see `sampling.grammar`).

The engine's `Constraints` owns one llguidance matcher per constrained request. Each step it fills the
bitmask of the constrained rows about to sample on a worker thread while the model runs (llguidance releases
the GIL), the sampler sends every token a row's mask forbids to -inf, and the chosen token advances the
matcher.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import torch

from llm_serving.errors import ServingError
from llm_serving.sampling.grammar import grammars_for
from llm_serving.sampling.params import GrammarSpec

log = logging.getLogger("llm_serving.engine")

_BITS = torch.arange(32, dtype=torch.int32)


@dataclass(frozen=True)
class RowMasks:
    """Allowed tokens of some rows of a step: `bits[j]` (int32 words, bit `t % 32` of word `t // 32`) is the
    mask of row `rows[j]`."""

    rows: tuple[int, ...]
    bits: torch.Tensor

    def allowed(self, vocab: int) -> torch.Tensor:
        """`[len(rows), vocab]` bools; ids past the mask (a vocabulary padded beyond the tokenizer's) are
        forbidden."""
        unpacked = ((self.bits.unsqueeze(-1) >> _BITS) & 1).flatten(1).bool()
        if unpacked.shape[1] >= vocab:
            return unpacked[:, :vocab]
        pad = torch.zeros((len(self.rows), vocab - unpacked.shape[1]), dtype=torch.bool)
        return torch.cat([unpacked, pad], dim=1)

    def apply(self, scores: torch.Tensor) -> None:
        """Forbidden tokens of the masked rows of float `[B, V]` scores to -inf, in place."""
        idx = list(self.rows)
        scores[idx] = scores[idx].masked_fill(~self.allowed(scores.shape[-1]), float("-inf"))


class PendingMasks:
    """The masks of one step, being filled."""

    def __init__(self, future: Future[RowMasks] | None) -> None:
        self._future = future

    def result(self) -> RowMasks | None:
        return None if self._future is None else self._future.result()


class Constraints:
    """The matchers of the engine's constrained requests. Engine thread only (masks fill on a worker while
    the engine waits for the model, never while it touches a matcher)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._matchers: dict[int, llguidance.LLMatcher] = {}
        self._worker: ThreadPoolExecutor | None = None

    def add(self, request_id: int, spec: GrammarSpec) -> str | None:
        """Start a matcher for a request; the error message when its grammar does not compile."""
        try:
            self._matchers[request_id] = grammars_for(self._tokenizer).matcher(spec)
        except ServingError as exc:
            return exc.text
        return None

    def forget(self, request_id: int) -> None:
        self._matchers.pop(request_id, None)

    def clear(self) -> None:
        self._matchers.clear()

    def start(self, request_ids: Sequence[int]) -> PendingMasks:
        """Begin filling the masks of the constrained ones among a step's sampling rows (in that order)."""
        rows = [(j, self._matchers[r]) for j, r in enumerate(request_ids) if r in self._matchers]
        if not rows:
            return PendingMasks(None)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        vocab = grammars_for(self._tokenizer).vocab_size
        return PendingMasks(self._worker.submit(_fill, rows, vocab))

    def advance(self, request_id: int, token: int) -> bool:
        """Feed a request's chosen token to its matcher; whether the grammar is complete (only EOS may
        follow), which ends the request. False for an unconstrained request."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return False
        if not matcher.consume_token(token):
            log.warning("request %d: grammar refused token %d: %s", request_id, token, matcher.get_error())
        return bool(matcher.is_stopped())


def _fill(rows: Sequence[tuple[int, llguidance.LLMatcher]], vocab: int) -> RowMasks:
    bits = torch.full((len(rows), (vocab + 31) // 32), -1, dtype=torch.int32)
    for j, (_, matcher) in enumerate(rows):
        row = bits[j]
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    return RowMasks(rows=tuple(i for i, _ in rows), bits=bits)
