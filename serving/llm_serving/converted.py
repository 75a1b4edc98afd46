"""The GGUF -> safetensors cache: a GGUF model is de-quantised (and its tokenizer converted) once, saved with
`save_pretrained` under `$HF_HOME/llm-serving/converted/<key>`, and later starts load that folder. The key
covers the GGUF file's identity (path, size, mtime) and the versions of the libraries that convert it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
from pathlib import Path

from llm_serving.source import ModelSource

log = logging.getLogger("llm_serving")

HF_HOME_ENV = "HF_HOME"
CONVERTED_SUBDIR = Path("llm-serving") / "converted"
FORMAT = "1"
"""Bumped when what a cache entry holds changes."""
CONVERTERS = ("transformers", "gguf", "torch", "tokenizers")
COMPLETE_MARK = "config.json"


def cache_root() -> Path:
    """`$HF_HOME/llm-serving/converted` (huggingface_hub's default HF_HOME when unset), read at call time."""
    home = os.environ.get(HF_HOME_ENV)
    if home is None:
        from huggingface_hub import constants

        home = constants.HF_HOME
    return Path(home) / CONVERTED_SUBDIR


def cache_key(gguf: Path, versions: dict[str, str]) -> str:
    """`<stem>-<hash>` of the file's resolved path, size and mtime, and the converters' versions."""
    stat = gguf.stat()
    parts = [FORMAT, str(gguf.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
    parts += [f"{name}={version}" for name, version in sorted(versions.items())]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return f"{gguf.stem}-{digest}"


def converter_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in CONVERTERS}


def converted_dir(source: ModelSource) -> Path:
    """Where the converted copy of a GGUF source lives (whether or not it exists yet)."""
    assert source.gguf_file is not None
    return cache_root() / cache_key(Path(source.location) / source.gguf_file, converter_versions())


def _convert_into(source: ModelSource, folder: Path) -> None:
    """De-quantise the GGUF to float32 and save model, generation config and tokenizer into `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {"gguf_file": source.gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(source.location, **common)
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, **common)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # the same model without transformers' GGUF marks, which refuse to save
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.generation_config = model.generation_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def ensure_converted(source: ModelSource) -> Path | None:
    """The converted folder of a GGUF source, made now if missing (written to a temporary folder beside it,
    then renamed); None when the cache cannot be written (read-only, full): the caller loads the GGUF."""
    target = converted_dir(source)
    if (target / COMPLETE_MARK).is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("GGUF cache %s not writable (%s): loading the GGUF", target.parent, exc)
        return None
    try:
        log.info("converting %s to safetensors in %s (once)", source.gguf_file, target)
        _convert_into(source, tmp)
        tmp.rename(target)
    except Exception as exc:  # a full disk: OSError or safetensors' own error
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / COMPLETE_MARK).is_file():  # another process renamed its copy first
            return target
        log.warning("GGUF cache %s could not be written (%s): loading the GGUF", target, exc)
        return None
    return target
