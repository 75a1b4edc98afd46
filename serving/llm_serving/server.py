"""Wiring: load the model, build the engine, serve HTTP on rank 0, follow plans on the other ranks."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn

from llm_contract import SERVING_PORT
from llm_serving.config import CacheOptions, Limits, check_capacity
from llm_serving.distributed import (
    DistContext,
    DistSettings,
    agree_num_blocks,
    follow_plans,
    init_distributed,
    plan_broadcaster,
)
from llm_serving.engine.async_engine import AsyncEngine
from llm_serving.engine.factory import EngineConfig, build_engine, build_kv_cache
from llm_serving.engine.kv_cache import PagedKVCache
from llm_serving.engine.runner import ModelRunner
from llm_serving.errors import IncompleteGenerationError
from llm_serving.http.app import build_app
from llm_serving.http.state import AppState, ModelInfo
from llm_serving.loading import ModelSource, eos_ids, load
from llm_serving.metrics import Metrics
from llm_serving.service import GenerationService

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


def _device(ctx: DistContext) -> str | None:
    import torch

    return f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else None


def engine_config(limits: Limits, cache: CacheOptions) -> EngineConfig:
    return EngineConfig(
        max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
        max_batch_size=limits.max_batch_size,
        max_batch_total_tokens=limits.max_batch_total_tokens,
        block_size=cache.block_size,
        prefix_caching=cache.prefix_caching,
        chunked_prefill=cache.chunked_prefill,
        kv_cache_memory_fraction=cache.memory_fraction,
    )


def sized_kv_cache(model: Any, limits: Limits, cache: CacheOptions, ctx: DistContext) -> PagedKVCache:
    """This rank's KV cache, the same number of blocks on every rank; ValueError (a clear refusal to start)
    when it cannot hold one request of `max_total_tokens`."""
    kv = build_kv_cache(model, engine_config(limits, cache), lambda n: agree_num_blocks(ctx, n))
    check_capacity(limits, kv.num_blocks * kv.block_size)
    log.info(
        "rank %d: KV cache of %d blocks x %d tokens = %d tokens",
        ctx.rank,
        kv.num_blocks,
        kv.block_size,
        kv.num_blocks * kv.block_size,
    )
    return kv


def build_service(
    model: Any,
    tokenizer: Any,
    limits: Limits,
    metrics: Metrics,
    ctx: DistContext,
    cache: CacheOptions | None = None,
) -> GenerationService:
    """Engine thread + service around an already loaded model (rank 0); the service's limits carry the
    KV cache's real capacity."""
    cache = cache or CacheOptions()
    kv = sized_kv_cache(model, limits, cache, ctx)
    engine = build_engine(
        model,
        tokenizer,
        eos_ids(model, tokenizer),
        engine_config(limits, cache),
        broadcast=plan_broadcaster(ctx),
        cache=kv,
    )
    metrics.set_cache_config(kv.block_size, kv.num_blocks)
    async_engine = AsyncEngine(engine, limits.max_concurrent_requests, on_step=metrics.on_step)
    effective = replace(limits, max_batch_total_tokens=engine.max_batch_total_tokens)
    return GenerationService(async_engine, tokenizer, effective, metrics)


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain on the first SIGTERM/SIGINT: `/health` and new requests answer 503 while the
    requests in progress finish; after `drain_seconds` the generations still open end with an error event.
    A second signal stops at once. With `exit_on_engine_failure` (tensor parallel: the other ranks are lost)
    a dead engine stops the server too, once its requests have their error."""

    def __init__(
        self,
        config: uvicorn.Config,
        state: AppState,
        drain_seconds: float,
        exit_on_engine_failure: bool = False,
    ) -> None:
        super().__init__(config)
        self._state = state
        self._drain_seconds = drain_seconds
        self._drain_deadline: float | None = None
        self._exit_on_engine_failure = exit_on_engine_failure

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
    """Run the whole server until SIGTERM/SIGINT (then drain); exits non-zero if the model failed to load
    or the engine failed."""
    ctx = init_distributed(options.dist)
    device = _device(ctx)
    if not ctx.is_driver:
        # Rank 0 drains open streams on SIGTERM and then sends the stop plan; the followers must outlive it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        model, _ = load(options.source, options.dtype, ctx.world_size, device)
        log.info("rank %d/%d: model loaded, tensor parallel %d", ctx.rank, ctx.world_size, model.tp_size or 1)
        kv = sized_kv_cache(model, options.limits, options.cache, ctx)
        follow_plans(ctx, ModelRunner(model, kv))
        return
    metrics = Metrics(options.source.model_id)
    state = AppState(
        limits=options.limits,
        metrics=metrics,
        model=ModelInfo(model_id=options.source.model_id, model_sha=options.source.revision),
        api_key=options.api_key,
    )

    def load_model() -> None:
        try:
            model, tokenizer = load(options.source, options.dtype, ctx.world_size, device)
            state.service = build_service(model, tokenizer, options.limits, metrics, ctx, options.cache)
            log.info("rank 0/%d: model loaded, tensor parallel %d", ctx.world_size, model.tp_size or 1)
            log.info("model %s loaded; ready", options.source.model_id)
        except Exception as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")
            server.should_exit = True

    config = uvicorn.Config(
        build_app(state),
        host=options.host,
        port=options.port,
        timeout_graceful_shutdown=END_FLUSH_SECONDS,
        log_level="info",
        access_log=False,
    )
    server = DrainingServer(config, state, options.graceful_shutdown_seconds, ctx.world_size > 1)
    loader = threading.Thread(target=load_model, name="loader", daemon=True)
    loader.start()
    server.run()
    loader.join()
    if state.service is not None:
        state.service.close()
        if state.service.failure is not None:
            raise SystemExit(f"engine failed: {state.service.failure}")
    if state.load_error is not None:
        raise SystemExit(f"model failed to load: {state.load_error}")
