"""Prometheus metrics under TGI's names (counters without `_total`) and vLLM's names, plus in-flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from llm_serving.outputs import StepStats

DURATION_BUCKETS = tuple(0.00015 * 1.5**i for i in range(35))
LENGTH_BUCKETS = tuple(float(2**i) for i in range(15))


class _RawCounters(Collector):
    """Counters exposed exactly by name, as TGI's exporter writes them (no `_total` suffix)."""

    def __init__(self, docs: dict[str, str]) -> None:
        self._docs = docs
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._docs)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            values = dict(self._values)
        for name, doc in self._docs.items():
            metric = Metric(name, doc, "counter")
            for (key_name, labels), value in values.items():
                if key_name == name:
                    metric.add_sample(name, dict(labels), value)
            yield metric


class _LoraInfo(Collector):
    """vLLM's `vllm:lora_requests_info` gauge: one sample whose labels name the adapters of the running and
    waiting requests (comma-joined) and whose value is when that was seen (Unix seconds, as vLLM sets it). The
    last step's sample replaces the one before (vLLM keeps old label sets; routers read the newest)."""

    NAME = "vllm:lora_requests_info"

    def __init__(self) -> None:
        self._max_lora: int | None = None
        self._sample: tuple[dict[str, str], float] | None = None

    def enable(self, max_lora: int) -> None:
        self._max_lora = max_lora
        self.update((), ())

    def update(self, running: tuple[str, ...], waiting: tuple[str, ...]) -> None:
        if self._max_lora is None:
            return
        labels = {
            "max_lora": str(self._max_lora),
            "waiting_lora_adapters": ",".join(waiting),
            "running_lora_adapters": ",".join(running),
        }
        self._sample = (labels, time.time())  # one assignment: a scrape sees the old sample or the new

    def collect(self) -> Iterator[Metric]:
        sample = self._sample
        if sample is not None:
            metric = Metric(self.NAME, "LoRA adapters of the running and waiting requests", "gauge")
            metric.add_sample(self.NAME, *sample)
            yield metric


class Metrics:
    """Every metric the server exports, in its own registry."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._model = model_name
        self.counters = _RawCounters(
            {
                "tgi_request_count": "Requests received",
                "tgi_request_success": "Requests that succeeded",
                "tgi_request_failure": "Requests that failed, by error type",
                "tgi_batch_inference_count": "Batch steps run, by method",
                "tgi_batch_inference_success": "Batch steps that succeeded, by method",
            }
        )
        r.register(self.counters)
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting", registry=r)
        self.batch_size = Gauge("tgi_batch_current_size", "Requests in the running batch", registry=r)
        self.batch_tokens = Gauge(
            "tgi_batch_current_max_tokens", "KV cache tokens held by the running batch's blocks", registry=r
        )
        self.batch_max_tokens = Gauge(
            "tgi_batch_max_total_tokens", "KV cache capacity in tokens (blocks x block size)", registry=r
        )
        self.in_flight = Gauge(
            "llm_serving_requests_in_flight", "Requests admitted and not finished", registry=r
        )
        self.graph_capture = Gauge(
            "llm_serving_cuda_graph_capture_seconds",
            "Start-up time spent capturing the decode CUDA graphs (0: none captured)",
            registry=r,
        )

        def hist(name: str, doc: str, buckets: Iterable[float] = DURATION_BUCKETS) -> Histogram:
            return Histogram(name, doc, buckets=tuple(buckets), registry=r)

        self.duration = hist("tgi_request_duration", "End-to-end request duration (s)")
        self.validation_duration = hist("tgi_request_validation_duration", "Validation duration (s)")
        self.grammar_compile_duration = hist(
            "tgi_request_grammar_compile_duration", "Structured-output grammar compile time, cache misses (s)"
        )
        self.queue_duration = hist("tgi_request_queue_duration", "Time in the queue (s)")
        self.inference_duration = hist("tgi_request_inference_duration", "Inference duration (s)")
        self.time_per_token = hist("tgi_request_mean_time_per_token_duration", "Mean time per token (s)")
        self.input_length = hist("tgi_request_input_length", "Input tokens", LENGTH_BUCKETS)
        self.generated_tokens = hist("tgi_request_generated_tokens", "Generated tokens", LENGTH_BUCKETS)
        self.max_new_tokens = hist("tgi_request_max_new_tokens", "Requested max_new_tokens", LENGTH_BUCKETS)
        self.batch_next_size = hist("tgi_batch_next_size", "Size of each step's batch", LENGTH_BUCKETS)
        self.forward_duration = Histogram(
            "tgi_batch_forward_duration",
            "Step duration (s)",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        labels = ["model_name"]
        self.v_running = Gauge("vllm:num_requests_running", "Requests running", labels, registry=r)
        self.v_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting", labels, registry=r)
        self.v_kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "Share of the KV cache blocks in use (0..1)", labels, registry=r
        )
        self.v_cache_config = Gauge(
            "vllm:cache_config_info",
            "KV cache layout (value 1)",
            ["block_size", "num_gpu_blocks"],
            registry=r,
        )
        self.v_prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels, registry=r
        )
        self.v_prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", labels, registry=r
        )
        self.v_preemptions = Counter(
            "vllm:num_preemptions", "Requests preempted (blocks freed, recomputed later)", labels, registry=r
        )

        self.v_prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens", labels, registry=r)
        self.v_generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", labels, registry=r)
        self.v_success = Counter(
            "vllm:request_success", "Finished requests", [*labels, "finished_reason"], registry=r
        )

        def vhist(name: str, doc: str, buckets: Iterable[float] = DURATION_BUCKETS) -> Histogram:
            return Histogram(name, doc, labels, buckets=tuple(buckets), registry=r)

        self.v_ttft = vhist("vllm:time_to_first_token_seconds", "Time to first token (s)")
        self.v_tpot = vhist("vllm:time_per_output_token_seconds", "Time per output token (s)")
        self.v_itl = vhist("vllm:inter_token_latency_seconds", "Inter-token latency (s)")
        self.v_e2e = vhist("vllm:e2e_request_latency_seconds", "End-to-end latency (s)")
        self.v_queue = vhist("vllm:request_queue_time_seconds", "Time in the queue (s)")
        self.v_prompt_hist = vhist("vllm:request_prompt_tokens", "Prompt tokens per request", LENGTH_BUCKETS)
        self.v_gen_hist = vhist(
            "vllm:request_generation_tokens", "Generated tokens per request", LENGTH_BUCKETS
        )
        # TGI exposes no time-to-first-token metric; this one uses TGI's naming style.
        self.ttft = hist("tgi_request_time_to_first_token_duration", "Time to first token (s)")
        self.itl = hist("tgi_request_inter_token_duration", "Inter-token latency (s)")
        self.v_lora_info = _LoraInfo()
        r.register(self.v_lora_info)

    def set_cache_config(self, block_size: int, num_blocks: int) -> None:
        """The KV cache's layout, once it is sized."""
        self.batch_max_tokens.set(block_size * num_blocks)
        self.v_cache_config.labels(str(block_size), str(num_blocks)).set(1)

    def set_graph_capture(self, seconds: float) -> None:
        """The decode CUDA graphs' capture time at start-up."""
        self.graph_capture.set(seconds)

    def set_adapters(self, names: tuple[str, ...]) -> None:
        """The LoRA adapters loaded: from now on `vllm:lora_requests_info` is exported (none: never)."""
        if names:
            self.v_lora_info.enable(len(names))

    def on_step(self, stats: StepStats) -> None:
        """Record one engine step (called from the engine thread); a step that ran no rows only updates
        the gauges."""
        self.v_lora_info.update(stats.running_adapters, stats.waiting_adapters)
        self.queue_size.set(stats.queue_size)
        self.batch_size.set(stats.batch_size)
        self.batch_tokens.set(stats.kv_tokens)
        self.v_running.labels(self._model).set(stats.batch_size)
        self.v_waiting.labels(self._model).set(stats.queue_size)
        self.v_kv_usage.labels(self._model).set(stats.kv_usage)
        self.v_prefix_queries.labels(self._model).inc(stats.prefix_queries)
        self.v_prefix_hits.labels(self._model).inc(stats.prefix_hits)
        self.v_preemptions.labels(self._model).inc(stats.preemptions)
        if not stats.rows:
            return
        self.batch_next_size.observe(stats.batch_size)
        method = "prefill" if stats.prefill_rows else "decode"
        self.counters.inc("tgi_batch_inference_count", method=method)
        if stats.failed:
            return
        self.counters.inc("tgi_batch_inference_success", method=method)
        self.forward_duration.labels(method).observe(stats.duration)

    def on_request_start(self) -> None:
        self.counters.inc("tgi_request_count")
        self.in_flight.inc()

    def on_rejected(self, error_type: str) -> None:
        """A request refused before it reached the engine."""
        self.counters.inc("tgi_request_count")
        self.counters.inc("tgi_request_failure", err=error_type)

    def on_token_gap(self, first: bool, seconds: float) -> None:
        """Record time to first token, or the gap since the previous token."""
        if first:
            self.ttft.observe(seconds)
            self.v_ttft.labels(self._model).observe(seconds)
        else:
            self.itl.observe(seconds)
            self.v_itl.labels(self._model).observe(seconds)
            self.v_tpot.labels(self._model).observe(seconds)

    def on_request_end(
        self,
        *,
        error_type: str | None,
        total: float,
        queue: float,
        input_tokens: int,
        generated: int,
        max_new_tokens: int,
        finish_reason: str | None,
    ) -> None:
        """Record the end of a request (success or failure)."""
        self.in_flight.dec()
        if error_type is not None:
            self.counters.inc("tgi_request_failure", err=error_type)
            return
        self.counters.inc("tgi_request_success")
        inference = max(0.0, total - queue)
        self.duration.observe(total)
        self.queue_duration.observe(queue)
        self.inference_duration.observe(inference)
        if generated:
            self.time_per_token.observe(inference / generated)
        self.input_length.observe(input_tokens)
        self.generated_tokens.observe(generated)
        self.max_new_tokens.observe(max_new_tokens)
        self.v_prompt_tokens.labels(self._model).inc(input_tokens)
        self.v_generation_tokens.labels(self._model).inc(generated)
        self.v_success.labels(self._model, finish_reason or "").inc()
        self.v_e2e.labels(self._model).observe(total)
        self.v_queue.labels(self._model).observe(queue)
        self.v_prompt_hist.labels(self._model).observe(input_tokens)
        self.v_gen_hist.labels(self._model).observe(generated)

    def exposition(self) -> bytes:
        """Text exposition; TGI's raw counters keep their own names in HELP/TYPE lines too."""
        text = generate_latest(self.registry)
        for name in self.counters.names:
            text = text.replace(f" {name}_total ".encode(), f" {name} ".encode())
        return text
