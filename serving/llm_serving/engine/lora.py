"""Grouped LoRA: peft adapters on one base model, rows of different adapters in one packed `[1, T]` step.

Each adapter's A and B matrices are read from peft's files (adapter_config.json, adapter_model.safetensors)
and checked against the base model. A forward hook on every targeted `nn.Linear` adds, for each adapter with
rows in the step, `scale * B(A(x[tokens of that adapter]))` to those tokens' outputs (index_select, two small
matmuls, index_add: faster on CPU than gathering per-token weights for a bmm, see bench/lora.py). The
token -> adapter grouping is built once per step by the runner (`lora_batch`) and handed to the hooks for the
duration of the forward (`LoraLayers.active`); a step with no adapter row runs the base model only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from llm_serving.progress import LoadError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_RANK = 256
"""Largest LoRA rank accepted (vLLM's `--max-lora-rank` tops out there too)."""
_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"
# peft options that change the maths beyond `W x + scale B A x`: refused rather than served wrong.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out",
    "lora_bias": "LoRA biases",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
    "alpha_pattern": "alpha_pattern",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
}


class AdapterError(LoadError):
    """An adapter that cannot be served on this base model (a start-up error naming it)."""

    def __init__(self, name: str, message: str, reason: str = "LoadFailed") -> None:
        super().__init__(reason, f"LoRA adapter {name!r}: {message}")


@dataclass(frozen=True)
class LoraWeights:
    """One adapter on one Linear: `a` is `[r, in]`, `b` is `[out, r]` with the adapter's scale folded in."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter's weights by the name of the base module they apply to."""

    name: str
    modules: Mapping[str, LoraWeights]


def check_config(name: str, config: Mapping[str, Any]) -> float:
    """The numerator of the adapter's scale (`lora_alpha`); AdapterError for what is not plain LoRA."""
    if config.get("peft_type") != "LORA":
        raise AdapterError(name, f"peft_type is {config.get('peft_type')!r}, only LORA is served")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(name, f"{what} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(name, f"bias={config['bias']!r} is not supported (only 'none')")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterError(name, "adapter_config.json has no numeric lora_alpha")
    return float(alpha)


def scale(alpha: float, rank: int, rslora: bool) -> float:
    """peft's LoRA scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def pair_tensors(
    name: str, tensors: Mapping[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) by base module name, from peft's `base_model.model.<module>.lora_{A,B}.weight` keys."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module = key.removeprefix(_PREFIX)
        if module.endswith(_A):
            pairs.setdefault(module.removesuffix(_A), {})["a"] = tensor
        elif module.endswith(_B):
            pairs.setdefault(module.removesuffix(_B), {})["b"] = tensor
        else:
            raise AdapterError(name, f"tensor {key!r} is not a LoRA A/B matrix of a Linear (not supported)")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise AdapterError(name, f"module {module!r} has lora_A or lora_B but not both")
        out[module] = (ab["a"], ab["b"])
    if not out:
        raise AdapterError(name, f"{WEIGHTS_FILE} holds no LoRA weights")
    return out


def read_adapter(name: str, folder: Path, model: nn.Module) -> LoraAdapter:
    """Read a peft LoRA adapter and check it fits `model`: every target is a Linear of the base, shapes match,
    rank at most MAX_RANK. Weights are cast to the base's dtype and device. Raises AdapterError."""
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(name, f"{folder} lacks {CONFIG_FILE} or {WEIGHTS_FILE}", "ModelNotFound")
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(weights_path)
    except (OSError, ValueError) as exc:  # safetensors raises its own subclasses of these
        raise AdapterError(name, f"cannot read it: {exc}", "WeightsCorrupt") from exc
    alpha = check_config(name, config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    # The output projection sees only the positions whose logits are kept, not every packed token.
    output = _get_output_embeddings(model)
    output_names = {n for n, m in linears.items() if m is output}
    modules: dict[str, LoraWeights] = {}
    for module, (a, b) in sorted(pair_tensors(name, tensors).items()):
        base = linears.get(module)
        if module in output_names:
            raise AdapterError(name, f"targets the output projection {module!r} (not supported)")
        if base is None:
            raise AdapterError(name, f"targets {module!r}, which is not a Linear of the base model")
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
            shapes = f"lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}"
            raise AdapterError(name, f"{module}: {shapes} disagree")
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise AdapterError(
                name,
                f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base's "
                f"{base.in_features} -> {base.out_features} Linear (an adapter for another model?)",
            )
        if not 0 < rank <= MAX_RANK:
            raise AdapterError(name, f"{module}: rank {rank} is not in 1..{MAX_RANK}")
        s = scale(alpha, rank, bool(config.get("use_rslora")))
        weight = base.weight
        modules[module] = LoraWeights(
            a=a.to(device=weight.device, dtype=weight.dtype),
            b=(b.double() * s).to(device=weight.device, dtype=weight.dtype),
        )
    return LoraAdapter(name=name, modules=modules)


def _get_output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    found = get() if callable(get) else None
    return found if isinstance(found, nn.Module) else None


@dataclass(frozen=True)
class LoraBatch:
    """One step's grouping: for each adapter slot with rows in the step, the packed indices of its tokens."""

    groups: tuple[tuple[int, torch.Tensor], ...]
    tokens: int
    """Tokens in the packed step."""


def lora_batch(slots: Sequence[int], counts: Sequence[int], device: torch.device) -> LoraBatch | None:
    """The grouping of a step whose rows run `counts[i]` tokens with adapter slot `slots[i]` (0: the base
    model, no LoRA); None when no row uses an adapter."""
    tokens: dict[int, list[int]] = {}
    offset = 0
    for slot, count in zip(slots, counts, strict=True):
        if slot:
            tokens.setdefault(slot, []).extend(range(offset, offset + count))
        offset += count
    if not tokens:
        return None
    groups = tuple(
        (slot, torch.tensor(ids, dtype=torch.long).to(device)) for slot, ids in sorted(tokens.items())
    )
    return LoraBatch(groups, offset)


def add_lora(
    x: torch.Tensor, out: torch.Tensor, batch: LoraBatch, weights: Mapping[int, LoraWeights]
) -> None:
    """`out[t] += B_a A_a x[t]` for the tokens `t` of each adapter slot `a` of `batch` (in place)."""
    flat_x = x.reshape(-1, x.shape[-1])
    flat_out = out.view(-1, out.shape[-1])
    if flat_x.shape[0] != batch.tokens:
        raise RuntimeError(f"a LoRA target ran on {flat_x.shape[0]} positions of a {batch.tokens}-token step")
    for slot, tokens in batch.groups:
        w = weights.get(slot)
        if w is not None:
            flat_out.index_add_(0, tokens, flat_x.index_select(0, tokens) @ w.a.T @ w.b.T)


class LoraLayers:
    """The adapters installed on a model: a forward hook per targeted Linear, and the step they apply to."""

    def __init__(self, model: nn.Module, adapters: Sequence[LoraAdapter]) -> None:
        names = [a.name for a in adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be unique: {names}")
        self.names: tuple[str, ...] = tuple(names)
        self.slots = {name: slot for slot, name in enumerate(names, 1)}
        self._batch: LoraBatch | None = None
        per_module: dict[str, dict[int, LoraWeights]] = {}
        for slot, adapter in enumerate(adapters, 1):
            for module, w in adapter.modules.items():
                per_module.setdefault(module, {})[slot] = w
        linears = dict(model.named_modules())
        self._handles = [linears[m].register_forward_hook(self._hook(w)) for m, w in per_module.items()]

    def _hook(self, weights: dict[int, LoraWeights]) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            batch = self._batch
            if batch is not None:
                add_lora(args[0], out, batch, weights)

        return hook

    def slot(self, adapter: str | None) -> int:
        """The slot of an adapter name (0 for the base model); ValueError for a name not installed."""
        if adapter is None:
            return 0
        found = self.slots.get(adapter)
        if found is None:
            raise ValueError(f"LoRA adapter {adapter!r} is not loaded")
        return found

    @contextmanager
    def active(self, batch: LoraBatch | None) -> Iterator[None]:
        """Apply `batch` in the forwards run inside (None: the base model only)."""
        self._batch = batch
        try:
            yield
        finally:
            self._batch = None

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()


def install(model: nn.Module, folders: Sequence[tuple[str, Path]]) -> LoraLayers:
    """Read the adapters `(name, folder)` (in order: slot 1, 2, ...) and hook them into `model`."""
    return LoraLayers(model, [read_adapter(name, folder, model) for name, folder in folders])
