"""A request inside the engine: its tokens, status and why it finished. No torch."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llm_serving.sampling.params import SamplingParams, StoppingParams


class FinishReason(enum.StrEnum):
    """TGI's finish reasons."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


@dataclass
class Request:
    """One sequence being generated; the scheduler and the engine mutate it in place."""

    id: int
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StoppingParams
    arrival: float
    prompt_logprobs: bool = False
    adapter: str | None = None  # the LoRA adapter it runs with (None: the base model)
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed: int = 0  # tokens of `all_ids` whose KV is in the cache
    blocks: list[int] = field(default_factory=list)  # block table: KV of positions [i * block_size, ...)
    preemptions: int = 0
    prompt_logprob_values: list[float] = field(default_factory=list)  # appended by the engine per chunk

    @property
    def reserved_tokens(self) -> int:
        """Tokens of KV cache this request may use at most."""
        return len(self.prompt_ids) + self.stopping.max_new_tokens

    @property
    def all_ids(self) -> tuple[int, ...]:
        """Prompt then generated tokens: what a recompute after preemption prefills."""
        return self.prompt_ids + tuple(self.output_ids)

    @property
    def num_tokens(self) -> int:
        """len(all_ids), without building it."""
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> tuple[int, ...]:
        """all_ids[start:end], without building all_ids."""
        prompt = len(self.prompt_ids)
        if start >= prompt:
            return tuple(self.output_ids[start - prompt : end - prompt])
        return self.prompt_ids[start:end] + tuple(self.output_ids[: max(0, end - prompt)])

    @property
    def done(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.CANCELLED)

    def finish(self, reason: FinishReason) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason

    def cancel(self) -> None:
        self.status = RequestStatus.CANCELLED

    def preempt(self) -> None:
        """Back to waiting with no KV (its blocks already released); generated tokens are kept.

        Prompt logprobs not yet delivered (no token generated) are recomputed from the start.
        """
        self.status = RequestStatus.WAITING
        self.num_computed = 0
        self.blocks = []
        self.preemptions += 1
        if not self.output_ids:
            self.prompt_logprob_values = []
