"""Grouped LoRA benchmark: ways to add per-token LoRA deltas to one Linear of a packed step, on this CPU.

For T packed tokens split evenly over 1-4 adapters of rank 16 (plus as many base-model tokens), on a Linear of
SmolLM2-135M's MLP (576 -> 1536) and a 4096-wide one, it times:
- `index`: per adapter, index_select its tokens, two small matmuls, index_add (what `engine/lora.py` does);
- `gather_bmm`: each token's A and B gathered from stacked (zero-padded) weights, two bmm;
- `dense_mask`: every token through every adapter's A (concatenated), a mask keeps its own adapter's ranks,
  then the concatenated B;
against the base Linear alone (`base`, the figure the LoRA time is a share of), and the cost a base-only step
pays for the hooks (`hooked_base`: the installed forward hook with no adapter rows). Fastest of `--repeats`
timings, the arms interleaved (the machine is shared: the minimum is the least noisy), one torch thread.

Then the engine on SmolLM2-135M (float32): 16 requests x 32 greedy tokens with no adapter installed, with
three rank-16 adapters (q/k/v/o/gate/up/down) installed but every row on the base model, and with the rows
spread over the base and the three adapters: tokens/s, best of `--rounds`.
Writes bench/results/lora.json.
Run: `.venv/bin/python -m bench.lora [--repeats 50] [--rounds 3]`
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.serving import PROMPTS
from llm_devstack.models import smollm2_dir
from llm_devstack.paths import ROOT
from llm_serving.engine.factory import EngineConfig, build_engine
from llm_serving.engine.lora import LoraBatch, LoraWeights, add_lora, lora_batch
from llm_serving.engine.request import Request
from llm_serving.loading import load
from llm_serving.sampling.params import SamplingParams, StoppingParams
from llm_serving.source import resolve

RANK = 16
SHAPES = ((576, 1536), (4096, 4096))
TOKENS = (16, 512)
ADAPTERS = (1, 2, 3, 4)


def _fastest(arms: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The fastest run of each arm in µs, the arms interleaved (A B C, A B C, ...): drift hits all alike."""
    best = dict.fromkeys(arms, float("inf"))
    for fn in arms.values():
        fn()
    for _ in range(repeats):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: value * 1e6 for name, value in best.items()}


def _slots(tokens: int, adapters: int) -> list[int]:
    """One row per token: half the tokens base (slot 0), the rest spread over the adapters."""
    return [0 if t % 2 == 0 else 1 + (t // 2) % adapters for t in range(tokens)]


def gather_bmm(x: torch.Tensor, idx: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token gathered weights: a `[S, r, in]`, b `[S, out, r]` (slot 0 zeros)."""
    h = torch.bmm(a.index_select(0, idx), x.unsqueeze(2))
    return torch.bmm(b.index_select(0, idx), h).squeeze(2)


def dense_mask(x: torch.Tensor, mask: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor) -> torch.Tensor:
    """Every adapter's ranks for every token, masked to the token's own."""
    return ((x @ a_cat.T) * mask) @ b_cat.T


def measure(fan_in: int, fan_out: int, tokens: int, adapters: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    linear = nn.Linear(fan_in, fan_out, bias=False)
    x = torch.randn(1, tokens, fan_in)
    weights = {
        s: LoraWeights(0.02 * torch.randn(RANK, fan_in), 0.02 * torch.randn(fan_out, RANK))
        for s in range(1, adapters + 1)
    }
    slots = _slots(tokens, adapters)
    batch = lora_batch(slots, [1] * tokens, torch.device("cpu"))
    assert isinstance(batch, LoraBatch)
    idx = torch.tensor(slots)
    a_stack = torch.stack([torch.zeros(RANK, fan_in), *(w.a for w in weights.values())])
    b_stack = torch.stack([torch.zeros(fan_out, RANK), *(w.b for w in weights.values())])
    a_cat = torch.cat([w.a for w in weights.values()])
    b_cat = torch.cat([w.b for w in weights.values()], dim=1)
    owner = torch.arange(adapters).repeat_interleave(RANK) + 1
    mask = (idx.unsqueeze(1) == owner.unsqueeze(0)).to(x.dtype)
    flat = x[0]

    def index() -> torch.Tensor:
        out: torch.Tensor = linear(x)
        add_lora(x, out, batch, weights)
        return out

    reference = index()[0]
    assert torch.allclose(
        linear(flat) + gather_bmm(flat, idx, a_stack, b_stack), reference, atol=1e-4, rtol=1e-4
    )
    assert torch.allclose(
        linear(flat) + dense_mask(flat, mask, a_cat, b_cat), reference, atol=1e-4, rtol=1e-4
    )
    hooked = nn.Linear(fan_in, fan_out, bias=False)
    hooked.load_state_dict(linear.state_dict())
    hooked.register_forward_hook(lambda m, args, out: None)
    with torch.inference_mode():
        return _fastest(
            {
                "base": lambda: linear(x),
                "index": index,
                "gather_bmm": lambda: linear(flat) + gather_bmm(flat, idx, a_stack, b_stack),
                "dense_mask": lambda: linear(flat) + dense_mask(flat, mask, a_cat, b_cat),
                "hooked_base": lambda: hooked(x),
            },
            repeats,
        )


def _engine_tokens_per_s(
    model: Any, tokenizer: Any, adapters: tuple[tuple[str, Path], ...], mix: bool
) -> float:
    """16 requests x 32 new tokens through a fresh engine; `mix`: request i runs adapter i % 4 (0: base)."""
    names = [None, *(name for name, _ in adapters)] if mix else [None]
    engine = build_engine(
        model, tokenizer, set(), EngineConfig(max_batch_total_tokens=8192, adapters=adapters)
    )
    for i, prompt in enumerate(PROMPTS[:16]):
        ids = tuple(tokenizer(prompt)["input_ids"])
        sampling, stopping = SamplingParams(), StoppingParams(max_new_tokens=32)
        engine.add(Request(i, ids, sampling, stopping, 0.0, adapter=names[i % len(names)]))
    start = time.perf_counter()
    while engine.has_work:
        engine.step()
    elapsed = time.perf_counter() - start
    if engine.runner.lora is not None:
        engine.runner.lora.remove()
    return 16 * 32 / elapsed


def engine_figures(rounds: int, folder: Path) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load(resolve(str(smollm2_dir())), "float32")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapters = []
    for seed in range(3):
        torch.manual_seed(seed)
        base, _ = load(resolve(str(smollm2_dir())), "float32")
        peft_model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets))
        peft_model.save_pretrained(str(folder / f"a{seed}"))
        adapters.append((f"a{seed}", folder / f"a{seed}"))
    arms = {
        "no_adapters": ((), False),
        "adapters_installed_base_rows": (tuple(adapters), False),
        "base_and_3_adapters_mixed": (tuple(adapters), True),
    }
    best = {name: 0.0 for name in arms}
    for _ in range(rounds):
        for name, (installed, mix) in arms.items():
            best[name] = max(best[name], _engine_tokens_per_s(model, tokenizer, installed, mix))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'linear':>11} {'T':>4} {'n':>2} | base µs | index | gather_bmm | dense_mask | hooked base")
    for fan_in, fan_out in SHAPES:
        for tokens in TOKENS:
            for adapters in ADAPTERS:
                f = measure(fan_in, fan_out, tokens, adapters, args.repeats)
                rows.append({"in": fan_in, "out": fan_out, "tokens": tokens, "adapters": adapters, **f})
                print(
                    f"{fan_in:>5}x{fan_out:<5} {tokens:>4} {adapters:>2} | {f['base']:7.0f} "
                    f"| {f['index'] / f['base']:5.2f}x | {f['gather_bmm'] / f['base']:9.2f}x "
                    f"| {f['dense_mask'] / f['base']:9.2f}x | {f['hooked_base'] / f['base']:5.2f}x"
                )
    with tempfile.TemporaryDirectory() as folder:
        engine = engine_figures(args.rounds, Path(folder))
    base = engine["no_adapters"]
    for name, value in engine.items():
        print(f"engine, SmolLM2, 16 x 32 tokens, {name}: {value:.1f} tok/s ({value / base:.2f}x no adapters)")
    out = ROOT / "bench" / "results" / "lora.json"
    meta = {"rank": RANK, "threads": 1, "machine": platform.machine(), "torch": torch.__version__}
    Path(out).write_text(json.dumps({"meta": meta, "linear": rows, "engine_tok_s": engine}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
