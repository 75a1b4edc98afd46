"""The paged runner computes, in float32 on CPU, the logits and prompt log-probs a plain full forward of the
model gives each sequence: rows packed together, prompts split over chunks, decode rows, shared prefix
blocks; for the attention of Llama, Qwen3 (GQA, wide head_dim), Gemma3 (sliding window), Gemma2 (softcap)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

from llm_serving.engine.kv_cache import (
    PagedKVCache,
    default_block_size,
    kv_bytes_per_token,
    num_blocks_for,
)
from llm_serving.engine.runner import ModelRunner, RowPlan, StepPlan, group_by_length
from tests.serving.models import tiny_gemma3_dir, tiny_model_dir, tiny_qwen3_dir

BLOCK = 4
TOLERANCE = 1e-4  # relative and absolute: float32 rounding of different matmul shapes


def _gemma2() -> Any:
    config = Gemma2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=256,
        initializer_range=0.3,
    )
    torch.manual_seed(7)
    return Gemma2ForCausalLM(config).eval()  # type: ignore[no-untyped-call]


def _load(directory: Callable[[], Path]) -> Callable[[], Any]:
    return lambda: AutoModelForCausalLM.from_pretrained(directory(), dtype=torch.float32).eval()  # type: ignore[no-untyped-call]


MODELS = {
    "llama": _load(tiny_model_dir),
    "qwen3-gqa": _load(tiny_qwen3_dir),
    "gemma3-sliding": _load(tiny_gemma3_dir),
    "gemma2-softcap": _gemma2,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> Any:
    return MODELS[request.param]()


def reference(model: Any, sequence: Sequence[int]) -> torch.Tensor:
    """Logits `[len, V]` of one plain forward over the whole sequence, with the model's own attention."""
    with torch.inference_mode():
        logits: torch.Tensor = model(input_ids=torch.tensor([list(sequence)])).logits[0].float()
    return logits


def sequences(model: Any, lengths: Sequence[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    vocab = min(int(model.config.vocab_size), 1000)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def tables(lengths: Sequence[int], seed: int = 0) -> list[tuple[int, ...]]:
    """Shuffled, disjoint block tables covering each length."""
    counts = [-(-n // BLOCK) for n in lengths]
    order = torch.randperm(sum(counts) + 3, generator=torch.Generator().manual_seed(seed)).tolist()
    out, at = [], 0
    for n in counts:
        out.append(tuple(order[at : at + n]))
        at += n
    return out


def run(
    runner: ModelRunner,
    seqs: Sequence[Sequence[int]],
    blocks: Sequence[tuple[int, ...]],
    steps: Sequence[Sequence[tuple[int, int, int, bool]]],
) -> list[tuple[int, int, torch.Tensor, list[float]]]:
    """Execute `steps` of rows (sequence, start, count, with prompt log-probs); every row samples. Returns
    (sequence, position of its last token, its logits, its log-probs) per row."""
    results = []
    for rows in steps:
        plan = StepPlan(
            rows=tuple(
                RowPlan(
                    tokens=tuple(seqs[s][start : start + count]),
                    start=start,
                    blocks=blocks[s],
                    sample=True,
                    logprob_targets=tuple(seqs[s][start + 1 : start + count + 1]) if logprobs else (),
                )
                for s, start, count, logprobs in rows
            )
        )
        out = runner.execute(plan)
        assert out.logits.shape[0] == len(rows)
        assert out.logits.dtype == torch.float32
        for (s, start, count, _), logits, logprobs in zip(rows, out.logits, out.prompt_logprobs, strict=True):
            results.append((s, start + count - 1, logits, logprobs))
    return results


def check(
    model: Any,
    seqs: Sequence[Sequence[int]],
    results: list[tuple[int, int, torch.Tensor, list[float]]],
    steps: Sequence[Sequence[tuple[int, int, int, bool]]],
) -> None:
    refs = [reference(model, s) for s in seqs]
    for s, last, logits, _ in results:
        torch.testing.assert_close(logits, refs[s][last], rtol=TOLERANCE, atol=TOLERANCE)
    rows = [row for step in steps for row in step]
    for (s, start, count, logprobs), (_, _, _, got) in zip(rows, results, strict=True):
        if not logprobs:
            assert got == []
            continue
        targets = torch.tensor(seqs[s][start + 1 : start + count + 1])
        want = refs[s][start : start + len(targets)].log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(got), want, rtol=TOLERANCE, atol=TOLERANCE)


def test_chunked_prefills_and_decode_rows_match_a_full_forward(model: Any) -> None:
    lengths = [42, 23, 11, 6]
    seqs = sequences(model, lengths)
    blocks = tables(lengths)
    runner = ModelRunner(model, PagedKVCache(model, num_blocks=sum(map(len, blocks)) + 3, block_size=BLOCK))
    steps: list[list[tuple[int, int, int, bool]]] = [
        [(0, 0, 13, True), (1, 0, 19, False), (2, 0, 9, False)],  # three prompts; the first in chunks
        [(1, 19, 1, False), (2, 9, 1, False), (0, 13, 14, True)],  # decode rows beside a continued chunk
        [(0, 27, 11, True), (1, 20, 1, False)],
        [(0, 38, 1, False), (1, 21, 1, False)],  # decode rows of different lengths
        [(1, 22, 1, False), (0, 39, 1, False)],
        [(0, 40, 1, False), (3, 0, 5, False)],
        [(0, 41, 1, False), (2, 10, 1, False), (3, 5, 1, False)],  # decode rows in two groups by length
    ]
    check(model, seqs, run(runner, seqs, blocks, steps), steps)


def test_blocks_are_zeroed_before_their_first_use_on_cpu(model: Any) -> None:
    """The CPU cache is allocated uninitialised (memory is committed as blocks get used): garbage, even NaN,
    in a block must be gone before a step reads it, padding block 0 included."""
    lengths = [21, 5]
    seqs = sequences(model, lengths)
    blocks = tables(lengths)
    cache = PagedKVCache(model, num_blocks=sum(map(len, blocks)) + 3, block_size=BLOCK)
    for tensor in (*cache.keys, *cache.values):
        tensor.fill_(float("nan"))
    steps = [[(0, 0, 20, False), (1, 0, 4, False)], [(0, 20, 1, False), (1, 4, 1, False)]]
    check(model, seqs, run(ModelRunner(model, cache), seqs, blocks, steps), steps)


def test_a_row_reuses_the_blocks_of_a_shared_prefix(model: Any) -> None:
    prefix = sequences(model, [3 * BLOCK], seed=1)[0]
    first, second = (prefix + tail for tail in sequences(model, [9, 6], seed=2))
    own = tables([len(first), 2 * BLOCK], seed=3)
    blocks = [own[0], own[0][:3] + own[1]]  # the second row starts with the first row's three full blocks
    runner = ModelRunner(model, PagedKVCache(model, num_blocks=32, block_size=BLOCK))
    steps = [
        [(0, 0, len(first), False)],
        [(1, 3 * BLOCK, 5, True)],  # only the suffix is computed
        [(1, 3 * BLOCK + 5, 1, False)],
    ]
    check(model, [first, second], run(runner, [first, second], blocks, steps), steps)


def test_execute_keeps_the_models_own_attention_outside_the_step() -> None:
    model = MODELS["llama"]()
    before = model.config._attn_implementation
    runner = ModelRunner(model, PagedKVCache(model, num_blocks=4, block_size=BLOCK))
    out = runner.execute(StepPlan(rows=(RowPlan(tokens=(1, 2, 3), start=0, blocks=(0,), sample=False),)))
    assert out.logits.shape[0] == 0
    assert out.prompt_logprobs == ([],)
    assert model.config._attn_implementation == before
    assert runner.execute(StepPlan(rows=())).prompt_logprobs == ()


def test_the_cache_is_sized_per_token_and_from_memory() -> None:
    model = MODELS["llama"]()  # 2 layers, 2 KV heads of 16, float32
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 16 * 4
    assert num_blocks_for(model, 16, 100, 0.9) == 7
    computed = num_blocks_for(model, 16, None, 0.9)
    assert 0 < computed <= 65536 // 16
    cache = PagedKVCache(model, num_blocks=3, block_size=16)
    assert len(cache.keys) == len(cache.values) == 2
    assert cache.keys[0].shape == (3, 16, 2, 16)
    assert cache.keys[0].dtype == torch.float32
    assert default_block_size("cpu") == 16
    assert default_block_size("cuda") == 256


def test_decode_rows_are_grouped_so_that_padding_stays_bounded() -> None:
    assert group_by_length([11, 3, 2]) == [[0, 1], [2]]
    assert group_by_length([2, 128, 2, 2, 2]) == [[1, 0], [2, 3, 4]]  # short rows are not padded to 128
    assert group_by_length([5, 5, 5, 5]) == [[0, 1, 2, 3]]
    assert group_by_length([]) == []
