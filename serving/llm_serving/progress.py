"""The loading phase and its progress, shared by the loader threads and the `/status` route. Torch-free."""

from __future__ import annotations

import threading
from dataclasses import replace

from llm_contract import LOAD_FAILURE_REASONS, LOAD_PHASES, LoadStatus


class LoadError(Exception):
    """A model that cannot load for a reason a person can fix (one of LOAD_FAILURE_REASONS)."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in LOAD_FAILURE_REASONS:
            raise ValueError(f"unknown load failure reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


class Progress:
    """Where loading stands; every method is safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status = LoadStatus("Starting")

    def phase(self, phase: str, total_bytes: int = 0, message: str | None = None) -> None:
        """Enter `phase` with `total_bytes` to move (0: unknown); the count of bytes done restarts at 0."""
        if phase not in LOAD_PHASES:
            raise ValueError(f"unknown load phase {phase!r}")
        with self._lock:
            self._status = replace(
                self._status, phase=phase, done_bytes=0, total_bytes=total_bytes, message=message
            )

    def advance(self, nbytes: int) -> None:
        """Count `nbytes` more bytes done in the current phase."""
        with self._lock:
            self._status = replace(self._status, done_bytes=self._status.done_bytes + nbytes)

    def set_done(self, done_bytes: int, total_bytes: int | None = None) -> None:
        """Set the bytes done (and, when given, the total) of the current phase."""
        with self._lock:
            total = self._status.total_bytes if total_bytes is None else total_bytes
            self._status = replace(self._status, done_bytes=done_bytes, total_bytes=total)

    def resolved(self, revision: str) -> None:
        """Record the commit being loaded."""
        with self._lock:
            self._status = replace(self._status, revision=revision)

    def adapters(self, names: tuple[str, ...]) -> None:
        """Record the LoRA adapters loaded."""
        with self._lock:
            self._status = replace(self._status, adapters=names)

    def fail(self, reason: str, message: str) -> LoadStatus:
        """Enter `Failed`; returns the status to report."""
        with self._lock:
            self._status = replace(self._status, phase="Failed", reason=reason, message=message)
            return self._status

    def snapshot(self) -> LoadStatus:
        """The status now."""
        with self._lock:
            return self._status
