"""Server limits and settings (TGI launcher defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Admission and validation limits; names follow TGI's launcher flags."""

    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_batch_total_tokens: int = 32768
    max_batch_prefill_tokens: int = 4096
    max_batch_size: int = 64
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    max_body_bytes: int = 2_000_000
    """Larger request bodies are refused with 413 before they are parsed."""
    validation_workers: int = 2
    """Threads that tokenize (and render chat templates) off the event loop; TGI's default."""

    def __post_init__(self) -> None:
        if not 0 < self.max_input_tokens < self.max_total_tokens:
            raise ValueError("max_input_tokens must be positive and smaller than max_total_tokens")
        if self.max_total_tokens > self.max_batch_total_tokens:
            raise ValueError("max_total_tokens must be <= max_batch_total_tokens")
        if self.max_body_bytes <= 0 or self.validation_workers <= 0:
            raise ValueError("max_body_bytes and validation_workers must be positive")
