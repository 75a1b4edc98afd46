"""Model loading: a local directory, a GGUF file, a Hub repo at a pinned revision, or a model in a package.

Weights are read at the disk's sequential bandwidth and counted on the `LoadingWeights` phase: on CPU the
safetensors files are read once into the page cache and then memory-mapped by `from_pretrained` (no copy);
on one GPU they are streamed through pinned buffers straight into device memory; under tensor parallelism
`from_pretrained` maps the files and each rank materialises only its own shard. A GGUF model is converted
once to safetensors (`llm_serving.converted`) and later starts load that copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.distributed import DistributedConfig  # type: ignore[attr-defined]
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import GENERATION_CONFIG_NAME

from llm_serving.converted import ensure_converted
from llm_serving.progress import Progress
from llm_serving.source import ModelSource, resolve
from llm_serving.weights import checkpoint_files, prefetch, read_to_device, total_bytes

__all__ = ["ModelSource", "eos_ids", "load", "pick_dtype", "resolve"]


def pick_dtype(name: str) -> torch.dtype | str:
    """`auto` is float32 on CPU (bfloat16 matmuls are slow there) and the checkpoint's dtype on GPU."""
    if name == "auto":
        return "auto" if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _local_folder(source: ModelSource, progress: Progress) -> Path | None:
    """The folder to load from: the source's own, the GGUF's converted copy, or the Hub snapshot fetched
    at the source's revision; None for a GGUF whose converted copy cannot be written."""
    if source.gguf_file is not None:
        message = f"converting {source.gguf_file} to safetensors (first start)"
        progress.phase("LoadingWeights", message=message)
        return ensure_converted(source)
    folder = Path(source.location)
    if folder.is_dir():
        return folder
    from llm_serving.download import fetch

    return fetch(source.location, source.revision, source.token, progress).path


def build_from_state_dict(folder: Path, state: dict[str, torch.Tensor], dtype: str, device: str) -> Any:
    """The model of `folder`'s config over tensors already read (they become its parameters, no copy)."""
    config = AutoConfig.from_pretrained(folder)
    model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=pick_dtype(dtype), device_map=device
    )
    if (folder / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def _load_folder(
    folder: Path, dtype: str, tp_size: int, device: str | None, progress: Progress
) -> tuple[Any, Any]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    files = checkpoint_files(folder)
    total = total_bytes(files)
    progress.phase("LoadingWeights", total)
    kwargs: dict[str, Any] = {"dtype": pick_dtype(dtype)}
    target = torch.device(device) if device is not None else None
    if tp_size > 1:
        kwargs["distributed_config"] = DistributedConfig(tp_size=tp_size)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    elif target is not None and target.type != "cpu" and files:
        model = build_from_state_dict(folder, read_to_device(files, target, progress), dtype, str(target))
    else:
        prefetch(files, progress)
        if device is not None:
            kwargs["device_map"] = device
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    progress.set_done(total)
    return model, tokenizer


def _load_gguf(
    source: ModelSource, dtype: str, tp_size: int, device: str | None, progress: Progress
) -> tuple[Any, Any]:
    """The GGUF itself, de-quantised by transformers (when its converted copy cannot be cached)."""
    progress.phase("LoadingWeights")
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file, "dtype": pick_dtype(dtype)}
    if tp_size > 1:
        kwargs["distributed_config"] = DistributedConfig(tp_size=tp_size)
    elif device is not None:
        kwargs["device_map"] = device
    return AutoModelForCausalLM.from_pretrained(source.location, **kwargs), tokenizer


def load(
    source: ModelSource,
    dtype: str = "auto",
    tp_size: int = 1,
    device: str | None = None,
    progress: Progress | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer); with `tp_size` > 1 the model is sharded with its tensor-parallel plan.
    `progress` gets `LoadingWeights` with the checkpoint's bytes, counted as they are read.

    On CUDA, attention runs on PyTorch's flash and memory-efficient kernels, not cuDNN's, whose decode steps
    of a continuous batch took 52-74 ms where these take 11-16 ms (H200, bf16;
    bench/results/gpu_check-h200-no-cudnn.json)."""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
    progress = progress or Progress()
    folder = _local_folder(source, progress)
    if folder is None:
        model, tokenizer = _load_gguf(source, dtype, tp_size, device, progress)
    else:
        model, tokenizer = _load_folder(folder, dtype, tp_size, device, progress)
    model.eval()
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
