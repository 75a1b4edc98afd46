"""The runner refuses a transformers too old for its `cache=` argument (seen on a GPU machine with 5.17:
the KV cache was silently ignored and every decoded token was wrong)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from llm_serving.engine.runner import ModelRunner


class _Model:
    def parameters(self) -> Iterator[torch.Tensor]:
        yield torch.zeros(1)


class _Before523(_Model):
    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> Any:
        raise NotImplementedError


class _Since523(_Model):
    def forward(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        cache: Any = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> Any:
        raise NotImplementedError


def test_runner_refuses_a_forward_without_the_cache_argument() -> None:
    with pytest.raises(RuntimeError, match=r"no `cache` argument .* transformers >= 5\.23"):
        ModelRunner(_Before523())


def test_runner_accepts_a_forward_with_the_cache_argument() -> None:
    assert ModelRunner(_Since523()).batch is None
