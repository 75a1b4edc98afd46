"""Test models: tiny random Llama, Qwen3 and Gemma3 over SmolLM2's real tokenizer, cached on disk, and
Llamas with injected faults. SmolLM2 itself and its tokenizer are the dev stack's (`llm_devstack.models`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llm_devstack.models import CACHE, atomic_dir, smollm2_version, tokenizer_dir


def _random_model_dir(name: str, build: Any) -> Path:
    """A random model over SmolLM2's tokenizer, made once by `build(tokenizer)` and saved under CACHE."""
    target = CACHE / f"{name}-{smollm2_version()}-v1"
    if not target.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
        torch.manual_seed(1234)
        model = build(tokenizer)
        tmp = atomic_dir(target)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    return target


def tiny_model_dir() -> Path:
    """A 2-layer, 64-wide random Llama over SmolLM2's vocabulary (safetensors + tokenizer)."""

    def build(tokenizer: Any) -> Any:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            initializer_range=0.3,
        )
        return LlamaForCausalLM(config)

    return _random_model_dir("tiny-llama", build)


class FaultyLlama(LlamaForCausalLM):  # type: ignore[no-untyped-call]
    """The tiny Llama with a real fault: its `fail_at`-th forward call raises `fault` (every later one too,
    unless `once`)."""

    fail_at: ClassVar[int] = 4
    fault: ClassVar[type[Exception]] = RuntimeError
    once: ClassVar[bool] = False

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_at or (self.calls > self.fail_at and not self.once):
            raise self.fault(f"injected fault at forward call {self.calls}")
        return super().forward(*args, **kwargs)


class OutOfMemoryOnceLlama(FaultyLlama):  # type: ignore[no-untyped-call]
    """Runs out of memory once (the engine fails that batch and goes on)."""

    fault = torch.OutOfMemoryError
    once = True


def tiny_qwen3_dir() -> Path:
    """A 2-layer random Qwen3: grouped-query attention (4 query heads on 1 KV head), head_dim 32 wider than
    hidden / heads, q/k norms."""

    def build(tokenizer: Any) -> Any:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
            initializer_range=0.3,
            tie_word_embeddings=False,
        )
        return Qwen3ForCausalLM(config)

    return _random_model_dir("tiny-qwen3", build)


def tiny_gemma3_dir() -> Path:
    """A 2-layer random Gemma3 text model whose first layer attends through an 8-token sliding window (the
    second is global), with a query scale that is not head_dim ** -0.5 (untied embeddings: tied ones at this
    size repeat one token)."""

    def build(tokenizer: Any) -> Any:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        config = Gemma3TextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
            initializer_range=0.3,
            tie_word_embeddings=False,
        )
        return Gemma3ForCausalLM(config)

    return _random_model_dir("tiny-gemma3", build)
