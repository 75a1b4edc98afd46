"""Generation service shared by the TGI and OpenAI routes: tokenize, validate, run, collect, measure."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from llm_serving.config import Limits
from llm_serving.errors import NoFastTokenizerError, ServingError, UnhealthyError, ValidationError
from llm_serving.metrics import Metrics
from llm_serving.outputs import Generation, GenerationResult, StreamItem
from llm_serving.protocol.tgi import GenerateParameters, SimpleToken
from llm_serving.sampling.grammar import grammars_for
from llm_serving.sampling.params import FrequencyRule, StoppingParams
from llm_serving.tokens import simple_tokens
from llm_serving.validation import ValidRequest, check_input_length, validate_input, validate_parameters

if TYPE_CHECKING:  # the engine loads torch; the routes that import this module do not need it
    from llm_serving.engine.async_engine import AsyncEngine

T = TypeVar("T")


class GenerationService:
    """Everything between a parsed request and the engine."""

    def __init__(
        self,
        engine: AsyncEngine | None,
        tokenizer: Any,
        limits: Limits,
        metrics: Metrics,
        adapters: tuple[str, ...] = (),
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics
        self.adapters = adapters
        """The LoRA adapters loaded (requests may name them)."""
        self._validation = ThreadPoolExecutor(limits.validation_workers, thread_name_prefix="validation")

    async def off_loop(self, work: Callable[[], T]) -> T:
        """Run CPU-bound request work (tokenizing, chat templates) on the validation workers."""
        return await asyncio.get_running_loop().run_in_executor(self._validation, work)

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def simple_tokens(self, text: str, *, add_special_tokens: bool = True) -> list[SimpleToken]:
        """`/tokenize`: more than `max_input_tokens` tokens is refused before the answer is built."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise NoFastTokenizerError()
        encoding = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        check_input_length(len(ids), self.limits)
        return simple_tokens(text, ids, encoding["offset_mapping"])

    def validate(
        self,
        inputs: str,
        params: GenerateParameters,
        *,
        stream: bool,
        add_special_tokens: bool = True,
        frequency_rule: FrequencyRule = FrequencyRule.TGI,
    ) -> ValidRequest:
        """Apply TGI's rules; raises `ValidationError` (counted as a failed request, as TGI does)."""
        try:
            valid = validate_parameters(
                params, self.limits, stream=stream, frequency_rule=frequency_rule, adapters=self.adapters
            )
            if valid.sampling.grammar is not None:
                compiled_in = grammars_for(self.tokenizer).compile(valid.sampling.grammar)
                if compiled_in is not None:
                    self.metrics.grammar_compile_duration.observe(compiled_in)
            if not inputs:
                raise ValidationError("`inputs` cannot be empty")
            ids = self.tokenize(inputs, add_special_tokens=add_special_tokens)
            return validate_input(inputs, ids, valid, self.limits)
        except ValidationError:
            self.metrics.on_rejected("validation")
            raise

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    @property
    def failure(self) -> str | None:
        """Why the engine stopped, if it did (the server is then unhealthy for good)."""
        return None if self.engine is None else self.engine.failure

    def _engine(self) -> AsyncEngine:
        if self.engine is None:
            raise UnhealthyError("Model is not loaded yet")
        return self.engine

    def close(self) -> None:
        """Stop the engine thread and the validation workers."""
        if self.engine is not None:
            self.engine.stop()
        self._validation.shutdown(wait=False, cancel_futures=True)

    async def _run(self, valid: ValidRequest, seed: int | None) -> AsyncGenerator[StreamItem, None]:
        engine = self._engine()
        sampling = valid.params.sampling
        if seed != sampling.seed:
            sampling = replace(sampling, seed=seed)
        stopping = StoppingParams(max_new_tokens=valid.max_new_tokens, stop=valid.params.stop)
        generation = Generation(seed=seed if sampling.do_sample else None)
        start = last = time.monotonic()
        self.metrics.on_request_start()
        error: str | None = "dropped"
        try:
            tokens = engine.generate(
                valid.input_ids, sampling, stopping, valid.params.decoder_input_details, valid.params.adapter
            )
            async with aclosing(tokens):
                async for event in tokens:
                    now = time.monotonic()
                    self.metrics.on_token_gap(not generation.tokens, now - last)
                    last = now
                    generation.tokens.append(event)
                    if event.queued is not None:
                        generation.queue_time = event.queued
                        generation.prompt_logprobs = event.prompt_logprobs
                    final = None
                    if event.finish_reason is not None:
                        generation.finish_reason = event.finish_reason
                        generation.text = self.decode([t.token.id for t in generation.tokens])
                        final = generation
                        error = None
                    yield StreamItem(event, final)
        except ServingError as exc:
            error = exc.error_type
            raise
        finally:
            self.metrics.on_request_end(
                error_type=error,
                total=time.monotonic() - start,
                queue=generation.queue_time,
                input_tokens=len(valid.input_ids),
                generated=len(generation.tokens),
                max_new_tokens=valid.max_new_tokens,
                finish_reason=generation.finish_reason.value if error is None else None,
            )

    def stream(self, valid: ValidRequest) -> AsyncGenerator[StreamItem, None]:
        """Stream one sequence; close the iterator to cancel it."""
        return self._run(valid, valid.params.sampling.seed)

    async def _collect(self, valid: ValidRequest, seed: int | None) -> Generation:
        async with aclosing(self._run(valid, seed)) as items:
            async for item in items:
                if item.final is not None:
                    return item.final
        raise ServingError("generation ended without a final token")

    async def generate(self, valid: ValidRequest) -> GenerationResult:
        """Run to completion; with `best_of` > 1 run that many seeds and keep the most likely sequence."""
        start = time.monotonic()
        if valid.params.best_of == 1:
            best = await self._collect(valid, valid.params.sampling.seed)
            return GenerationResult(valid, best, (), time.monotonic() - start)
        seeds = [random.getrandbits(63) for _ in range(valid.params.best_of)]
        tasks = [asyncio.ensure_future(self._collect(valid, s)) for s in seeds]
        try:
            generations = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        ranked = sorted(generations, key=lambda g: g.logprob, reverse=True)
        return GenerationResult(valid, ranked[0], tuple(ranked[1:]), time.monotonic() - start)
