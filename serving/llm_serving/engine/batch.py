"""The running batch on the model side: one left-padded KV cache for all rows, filtered and concatenated."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache


@dataclass
class Batch:
    """KV cache `[B, heads, T, dim]` per layer plus the `[B, T]` attention mask (0 marks left padding)."""

    cache: DynamicCache
    mask: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def layers(self) -> list[Any]:
        """The cache's per-layer `keys`/`values` holders."""
        return list(self.cache.layers)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for layer in self.layers:
            layer.keys = fn(layer.keys)
            layer.values = fn(layer.values)

    def filter(self, keep: Sequence[int]) -> Batch | None:
        """Keep rows `keep` (in that order) and drop padding columns no row needs any more."""
        if not keep:
            return None
        if list(keep) != list(range(self.size)):
            index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
            self._map(lambda t: t.index_select(0, index))
            self.mask = self.mask.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        if first > 0:
            self._map(lambda t: t[:, :, first:])
            self.mask = self.mask[:, first:]
        return self

    def pad_left(self, width: int) -> None:
        """Grow to `width` columns by padding on the left."""
        extra = width - self.width
        if extra <= 0:
            return

        def grow(t: torch.Tensor) -> torch.Tensor:
            pad = t.new_zeros((t.shape[0], t.shape[1], extra, t.shape[3]))
            return torch.cat([pad, t], dim=2)

        self._map(grow)
        self.mask = torch.cat([self.mask.new_zeros((self.size, extra)), self.mask], dim=1)

    @staticmethod
    def concat(first: Batch | None, second: Batch | None) -> Batch | None:
        """Rows of `first` then rows of `second`, left-padded to a common width."""
        if first is None or second is None:
            return first or second
        width = max(first.width, second.width)
        first.pad_left(width)
        second.pad_left(width)
        for a, b in zip(first.layers, second.layers, strict=True):
            a.keys = torch.cat([a.keys, b.keys], dim=0)
            a.values = torch.cat([a.values, b.values], dim=0)
        first.mask = torch.cat([first.mask, second.mask], dim=0)
        return first
