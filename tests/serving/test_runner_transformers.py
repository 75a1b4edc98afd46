"""The runner refuses a model whose code does not dispatch attention through transformers' AttentionInterface:
its own attention would run over the whole packed step (rows attending to each other, no KV cache) and give
wrong tokens without an error."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

from llm_serving.engine.kv_cache import PagedKVCache
from llm_serving.engine.runner import ModelRunner
from tests.serving.models import tiny_model_dir


def test_runner_refuses_a_model_without_the_attention_interface() -> None:
    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    cache = PagedKVCache(model, num_blocks=2, block_size=16)
    with pytest.raises(RuntimeError, match="does not dispatch attention through transformers' Attention"):
        ModelRunner(model, cache)


def test_runner_accepts_a_model_with_the_attention_interface() -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32)
    assert ModelRunner(model, PagedKVCache(model, num_blocks=2, block_size=16)).alone
