"""Runs the model for one step: filter the batch, decode the kept rows, prefill new prompts, concatenate.

Every rank executes the same `StepPlan`; under tensor parallelism rank 0 broadcasts it first.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from llm_serving.engine.batch import Batch


@dataclass(frozen=True)
class StepPlan:
    """One step, as plain data that can be sent to other ranks."""

    keep: tuple[int, ...]
    decode_tokens: tuple[int, ...]
    prompts: tuple[tuple[int, ...], ...]
    prompt_logprobs: tuple[bool, ...]


@dataclass(frozen=True)
class StepLogits:
    """Next-token logits `[rows, V]` (decode rows, then prefill rows) and prompt log-probs when asked."""

    logits: torch.Tensor
    prompt_logprobs: tuple[list[float] | None, ...]


def check_cache_argument(model: Any) -> None:
    """The runner hands its KV cache over as `cache=` (transformers >= 5.23). Older releases call it
    `past_key_values` and take `cache=` silently into `**kwargs`: the model would then build a cache of its
    own and every decode step would see only its new token (wrong tokens, no error). Refuse that here."""
    parameters = inspect.signature(model.forward).parameters
    if "cache" not in parameters and "past_key_values" in parameters:
        import transformers

        raise RuntimeError(
            f"{type(model).__name__}.forward has no `cache` argument (transformers "
            f"{transformers.__version__}); llm_serving needs transformers >= 5.23"
        )


class ModelRunner:
    """Owns the model and the running batch's KV cache on one rank."""

    def __init__(self, model: Any, broadcast: Callable[[StepPlan | None], None] | None = None) -> None:
        check_cache_argument(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.batch: Batch | None = None
        self._broadcast = broadcast

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache, keep: int
    ) -> Any:
        return self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask,
            position_ids=pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=keep,
        )

    def _prefill(self, plan: StepPlan) -> tuple[Batch, torch.Tensor, tuple[list[float] | None, ...]]:
        width = max(len(p) for p in plan.prompts)
        ids = torch.zeros((len(plan.prompts), width), dtype=torch.long)
        mask = torch.zeros((len(plan.prompts), width), dtype=torch.long)
        for i, prompt in enumerate(plan.prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        mask = mask.to(self.device)
        pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()
        want = any(plan.prompt_logprobs)
        out = self._forward(ids, mask, pos, cache, 0 if want else 1)
        logits = out.logits[:, -1, :].float()
        logprobs: list[list[float] | None] = []
        for i, prompt in enumerate(plan.prompts):
            if not plan.prompt_logprobs[i]:
                logprobs.append(None)
                continue
            row = out.logits[i, width - len(prompt) : width - 1].float().log_softmax(dim=-1)
            target = torch.tensor(prompt[1:], dtype=torch.long, device=row.device).unsqueeze(1)
            logprobs.append(row.gather(1, target).squeeze(1).tolist())
        return Batch(cache=cache, mask=mask), logits, tuple(logprobs)

    def _decode(self, batch: Batch, tokens: tuple[int, ...]) -> torch.Tensor:
        pos = batch.mask.sum(dim=1, keepdim=True)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.size, 1))], dim=1)
        ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
        out = self._forward(ids, batch.mask, pos, batch.cache, 1)
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    def execute(self, plan: StepPlan) -> StepLogits:
        """Run one step on this rank (broadcasting the plan first on rank 0 of a TP group)."""
        if self._broadcast is not None:
            self._broadcast(plan)
        with torch.inference_mode():
            batch = self.batch.filter(plan.keep) if self.batch is not None else None
            parts: list[torch.Tensor] = []
            if batch is not None:
                parts.append(self._decode(batch, plan.decode_tokens))
            prompt_logprobs: tuple[list[float] | None, ...] = ()
            if plan.prompts:
                new, logits, prompt_logprobs = self._prefill(plan)
                parts.append(logits)
                batch = Batch.concat(batch, new)
            self.batch = batch
            logits = torch.cat(parts, dim=0).cpu() if parts else torch.empty(0)
        return StepLogits(logits=logits, prompt_logprobs=prompt_logprobs)

    @property
    def alone(self) -> bool:
        """Whether this runner has no tensor-parallel peers."""
        return self._broadcast is None

    def reset(self) -> None:
        """Drop the batch after a failed step (a runner without peers only)."""
        self.batch = None

    def shutdown(self) -> None:
        """Tell the other ranks to leave their loop."""
        if self._broadcast is not None:
            self._broadcast(None)
