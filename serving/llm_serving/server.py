"""Wiring: serve HTTP on rank 0 from the first second (`/status`, `/health`, `/metrics`), load the model on a
thread once the port is bound, follow plans on the other ranks. Torch-free: the heavy imports are `boot`'s."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn

from llm_contract import SERVING_PORT, failure_line
from llm_serving.adapters import AdapterSource
from llm_serving.config import COMPUTE_TYPE_ENV, CacheOptions, DistSettings, Limits, launch_ranks
from llm_serving.errors import IncompleteGenerationError
from llm_serving.http.app import build_app
from llm_serving.http.state import AppState, ModelInfo
from llm_serving.metrics import Metrics
from llm_serving.progress import LoadError, Progress
from llm_serving.source import ModelSource

log = logging.getLogger("llm_serving")

END_FLUSH_SECONDS = 2
"""After the drain budget: how long the generations it ended get to send their error event."""


@dataclass(frozen=True)
class ServerOptions:
    source: ModelSource
    limits: Limits
    cache: CacheOptions = field(default_factory=CacheOptions)
    host: str = "0.0.0.0"
    port: int = SERVING_PORT
    api_key: str | None = None
    dtype: str = "auto"
    graceful_shutdown_seconds: int = 30
    """On SIGTERM: requests in progress get this long to finish (new ones get 503), then they are ended."""
    dist: DistSettings = field(default_factory=DistSettings)
    adapters: tuple[AdapterSource, ...] = ()
    """LoRA adapters (`--adapter`), loaded after the base model."""


def failure_of(exc: BaseException) -> tuple[str, str]:
    """(reason, message) of a load that raised `exc`: a `LoadError`'s own, else `LoadFailed`."""
    if isinstance(exc, LoadError):
        return exc.reason, exc.message
    return "LoadFailed", f"{type(exc).__name__}: {exc}"


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain on the first SIGTERM/SIGINT: `/health` and new requests answer 503 while the
    requests in progress finish; after `drain_seconds` the generations still open end with an error event.
    A second signal stops at once. With `exit_on_engine_failure` (tensor parallel: the other ranks are lost)
    a dead engine stops the server too, once its requests have their error. `on_listening` runs once the
    port is bound."""

    def __init__(
        self,
        config: uvicorn.Config,
        state: AppState,
        drain_seconds: float,
        exit_on_engine_failure: bool = False,
        on_listening: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_listening = on_listening
        self._state = state
        self._drain_seconds = drain_seconds
        self._drain_deadline: float | None = None
        self._exit_on_engine_failure = exit_on_engine_failure

    async def startup(self, sockets: Any = None) -> None:
        """Bind, then call `on_listening` (the model loads from then on)."""
        await super().startup(sockets)
        if self.started and self._on_listening is not None:
            self._on_listening()

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._drain_deadline is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._state.draining = True
        self._drain_deadline = time.monotonic() + self._drain_seconds

    async def on_tick(self, counter: int) -> bool:
        service = self._state.service
        if self._exit_on_engine_failure and service is not None and service.failure is not None:
            self.should_exit = True
        if self._drain_deadline is not None and not self.should_exit:
            if not self.server_state.tasks:
                self.should_exit = True
            elif time.monotonic() >= self._drain_deadline:
                self._end_generations()
                self.should_exit = True
        return await super().on_tick(counter)

    def _end_generations(self) -> None:
        service = self._state.service
        if service is None or service.engine is None:
            return
        message = f"Server is shutting down: the {self._drain_seconds:g} s drain ended before the generation"
        log.warning("drain period over: ending %d open request(s)", service.engine.in_flight)
        service.engine.abort_all(lambda: IncompleteGenerationError(message))

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Like uvicorn's, minus re-raising the signal afterwards: the engine and other ranks stop cleanly."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def serve(options: ServerOptions) -> None:
    """Run the whole server until SIGTERM/SIGINT (then drain). Exits non-zero if the engine failed, or if the
    model failed to load: then the last line on stderr is `llm_contract.failure_line` of the status."""
    ranks = launch_ranks()
    if ranks.rank != 0:
        # Rank 0 drains open streams on SIGTERM and then sends the stop plan; the followers must outlive it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        from llm_serving import boot

        boot.follow(options)
        return
    progress = Progress()
    metrics = Metrics(options.source.model_id)
    state = AppState(
        limits=options.limits,
        metrics=metrics,
        model=ModelInfo(
            model_id=options.source.model_id,
            model_sha=options.source.revision,
            adapters=tuple(a.name for a in options.adapters),
        ),
        progress=progress,
        api_key=options.api_key,
    )

    def load_model() -> None:
        try:
            from llm_serving import boot  # torch and transformers: only once `/status` answers

            service = boot.load_service(options, progress, metrics)
            state.compute_type = os.environ.get(COMPUTE_TYPE_ENV) or boot.compute_type()
            if commit := progress.snapshot().revision:  # a Hub repo: `/info` reports the commit loaded
                state.model = replace(state.model, model_sha=commit)
            progress.phase("Ready")
            state.service = service
            log.info("model %s loaded; ready", options.source.model_id)
        except Exception as exc:
            progress.fail(*failure_of(exc))
            log.exception("model failed to load")
            server.should_exit = True

    loader = threading.Thread(target=load_model, name="loader", daemon=True)
    config = uvicorn.Config(
        build_app(state),
        host=options.host,
        port=options.port,
        timeout_graceful_shutdown=END_FLUSH_SECONDS,
        log_level="info",
        access_log=False,
        server_header=False,  # TGI (hyper) sends none
    )
    server = DrainingServer(
        config, state, options.graceful_shutdown_seconds, ranks.world_size > 1, on_listening=loader.start
    )
    server.run()
    if loader.ident is not None:  # started: the port was bound
        loader.join()
    if state.service is not None:
        state.service.close()
        if state.service.failure is not None:
            raise SystemExit(f"engine failed: {state.service.failure}")
    status = progress.snapshot()
    if status.phase == "Failed":
        sys.stderr.write(failure_line(status) + "\n")
        sys.stderr.flush()
        raise SystemExit(1)
