"""LoRA adapters as the server sees them: the `--adapter` flags, where each adapter's files come from, and
which adapter a request names (TGI `parameters.adapter_id`, OpenAI `model`). Torch-free."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llm_contract import adapter_token_env, parse_adapter_arg
from llm_serving.errors import ModelNotFoundError, ValidationError
from llm_serving.progress import Progress
from llm_serving.source import resolve

BASE_MODEL_ALIAS = "tgi"
"""The OpenAI `model` that names the base model besides its own id (TGI's placeholder)."""


@dataclass(frozen=True)
class AdapterSource:
    """One `--adapter NAME=SOURCE[@REVISION]`, with the Hub token from env `adapter_token_env(name)`."""

    name: str
    source: str
    revision: str | None = None
    token: str | None = None


def parse_adapters(values: Sequence[str], env: Mapping[str, str]) -> tuple[AdapterSource, ...]:
    """The `--adapter` flags in order; ValueError for a malformed one or a name given twice."""
    adapters: list[AdapterSource] = []
    for value in values:
        name, source, revision = parse_adapter_arg(value)
        if name == BASE_MODEL_ALIAS:
            raise ValueError(f"--adapter name {name!r} is reserved for the base model")
        if any(a.name == name for a in adapters):
            raise ValueError(f"--adapter name {name!r} is given twice")
        adapters.append(AdapterSource(name, source, revision, env.get(adapter_token_env(name)) or None))
    return tuple(adapters)


def check_tensor_parallel(world_size: int, adapters: Collection[AdapterSource]) -> None:
    """LoRA adapters are served on one rank only; ValueError (a refusal to start) under tensor parallelism."""
    if adapters and world_size > 1:
        names = ", ".join(a.name for a in adapters)
        raise ValueError(
            f"LoRA adapters ({names}) are not supported with tensor parallelism ({world_size} ranks): "
            "serve them on one GPU, or drop --adapter"
        )


Fetch = Callable[[str, str | None, str | None, Progress], Path]


def hub_fetch(repo_id: str, revision: str | None, token: str | None, progress: Progress) -> Path:
    """An adapter repo's snapshot folder, through the server's Hub download."""
    from llm_serving.download import fetch

    return fetch(repo_id, revision, token, progress).path


def adapter_folder(adapter: AdapterSource, fetch: Fetch = hub_fetch) -> Path:
    """The local folder of an adapter's peft files: its directory, its package's, or the Hub snapshot (fetched
    with a progress of its own: the server's `/status` follows the base model's download)."""
    source = resolve(adapter.source, adapter.revision, adapter.token)
    folder = Path(source.location)
    if folder.is_dir():
        return folder
    return fetch(source.location, source.revision, source.token, Progress())


def tgi_adapter(adapter_id: str | None, adapters: Collection[str]) -> str | None:
    """The adapter TGI's `parameters.adapter_id` names (None or "": the base model); ValidationError when it
    is not loaded."""
    if not adapter_id:
        return None
    if adapter_id not in adapters:
        loaded = ", ".join(sorted(adapters)) or "none"
        raise ValidationError(f"`adapter_id` {adapter_id!r} is not a loaded LoRA adapter (loaded: {loaded})")
    return adapter_id


def openai_adapter(model: str | None, base_model: str, adapters: Collection[str]) -> str | None:
    """The adapter an OpenAI `model` names: None for the base model (its id, `tgi` or no model). With adapters
    loaded any other name is `ModelNotFoundError` (404); without, TGI's rule holds: any model is the base."""
    if model is None or model in (base_model, BASE_MODEL_ALIAS) or not adapters:
        return None
    if model not in adapters:
        raise ModelNotFoundError(f"The model `{model}` does not exist.")
    return model
