"""Model loading: a local directory, a GGUF file, a Hub repo at a pinned revision, or a model in a package."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.distributed import DistributedConfig  # type: ignore[attr-defined]

PACKAGE_PREFIX = "pkg:"


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from, as `from_pretrained` arguments."""

    model_id: str
    location: str
    gguf_file: str | None = None
    revision: str | None = None
    token: str | None = None


def _package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise FileNotFoundError(f"package {name!r} is not installed")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin is None:
        raise FileNotFoundError(f"package {name!r} has no files")
    return Path(spec.origin).parent


def resolve(spec: str, revision: str | None = None, token: str | None = None) -> ModelSource:
    """Interpret `--model`: `pkg:<package>`, a `.gguf` path, a local directory, or a Hub repo id."""
    if spec.startswith(PACKAGE_PREFIX):
        folder = _package_dir(spec[len(PACKAGE_PREFIX) :])
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            return ModelSource(model_id=ggufs[0].stem, location=str(folder), gguf_file=ggufs[0].name)
        return ModelSource(model_id=folder.name, location=str(folder))
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return ModelSource(model_id=path.stem, location=str(path.parent), gguf_file=path.name)
    if path.is_dir():
        return ModelSource(model_id=path.name, location=str(path))
    return ModelSource(model_id=spec, location=spec, revision=revision, token=token)


def pick_dtype(name: str) -> torch.dtype | str:
    """`auto` is float32 on CPU (bfloat16 matmuls are slow there) and the checkpoint's dtype on GPU."""
    if name == "auto":
        return "auto" if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load(
    source: ModelSource, dtype: str = "auto", tp_size: int = 1, device: str | None = None
) -> tuple[Any, Any]:
    """Load (model, tokenizer); with `tp_size` > 1 the model is sharded with its tensor-parallel plan.

    On CUDA, attention runs on PyTorch's flash and memory-efficient kernels, not cuDNN's, whose decode steps
    of a continuous batch took 52-74 ms where these take 11-16 ms (H200, bf16;
    bench/results/gpu_check-h200-no-cudnn.json)."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
    common: dict[str, Any] = {"revision": source.revision, "token": source.token}
    if source.gguf_file is not None:
        common["gguf_file"] = source.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source.location, **common)
    kwargs: dict[str, Any] = {**common, "dtype": pick_dtype(dtype)}
    if tp_size > 1:
        kwargs["distributed_config"] = DistributedConfig(tp_size=tp_size)
    elif device is not None:
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    model.eval()  # type: ignore[no-untyped-call]
    return model, tokenizer


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends generation: the generation config's, the model config's and the tokenizer's."""
    ids: set[int] = set()
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return ids
