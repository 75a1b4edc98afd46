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
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None

    @property
    def reserved_tokens(self) -> int:
        """Tokens of KV cache this request may use at most."""
        return len(self.prompt_ids) + self.stopping.max_new_tokens

    @property
    def done(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.CANCELLED)

    def finish(self, reason: FinishReason) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason

    def cancel(self) -> None:
        self.status = RequestStatus.CANCELLED
