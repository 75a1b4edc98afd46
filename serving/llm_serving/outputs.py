"""What generation produces, as plain data: engine events and step stats, finished sequences and results.

No torch: the HTTP routes, the response bodies and the metrics import these without loading the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_serving.engine.request import FinishReason
from llm_serving.validation import ValidRequest


@dataclass(frozen=True)
class TokenInfo:
    """One token: its id, its text, its log-prob and whether it is a special token."""

    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request; the last one carries the finish reason. A request's first
    token carries its prompt log-probs (when asked) and how long it waited before it was first scheduled."""

    request_id: int
    token: TokenInfo
    top: tuple[TokenInfo, ...]
    finish_reason: FinishReason | None
    prompt_logprobs: list[float] | None = None
    queued: float | None = None


@dataclass(frozen=True)
class FailureEvent:
    """The step that held this request failed (the exception's type and message); the engine goes on."""

    request_id: int
    message: str


Event = TokenEvent | FailureEvent


@dataclass(frozen=True)
class StepStats:
    """What one step did, for metrics; `rows == 0` for a step that only released finished requests."""

    queue_size: int
    batch_size: int
    """Requests in the running batch (holding KV blocks)."""
    rows: int
    batch_tokens: int
    """Tokens the forward ran."""
    prefill_rows: int
    decode_rows: int
    duration: float
    kv_tokens: int
    """Tokens of KV cache held by the running batch's blocks."""
    kv_usage: float
    prefix_queries: int
    """Prompt tokens looked up in the prefix cache during this step."""
    prefix_hits: int
    preemptions: int
    failed: bool = False
    """The step raised: its requests ended with a `FailureEvent`."""
    running_adapters: tuple[str, ...] = ()
    """LoRA adapters of the running requests (vLLM's `running_lora_adapters`)."""
    waiting_adapters: tuple[str, ...] = ()
    """LoRA adapters of the waiting requests."""


@dataclass
class Generation:
    """One finished sequence."""

    tokens: list[TokenEvent] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = FinishReason.LENGTH
    seed: int | None = None
    prompt_logprobs: list[float] | None = None
    queue_time: float = 0.0

    @property
    def logprob(self) -> float:
        return sum(t.token.logprob for t in self.tokens)


@dataclass(frozen=True)
class GenerationResult:
    """The best sequence, the other `best_of` candidates, and timings."""

    request: ValidRequest
    best: Generation
    others: tuple[Generation, ...]
    total_time: float


@dataclass(frozen=True)
class StreamItem:
    """A streamed token; `final` is set on the last one."""

    event: TokenEvent
    final: Generation | None
