"""Decode graphs: the bucket a batch pads to, the static buffers' contents, padded rows that touch only the
scratch block and are dropped, and the eager run over the static buffers (what a CUDA graph captures) giving
the logits of the plain packed runner; on CUDA also the captured graphs themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llm_serving.engine.factory import EngineConfig, uses_graphs
from llm_serving.engine.graphs import (
    DecodeGraphs,
    batch_buckets,
    bucket_for,
    decode_inputs,
    graphable,
)
from llm_serving.engine.kv_cache import PagedKVCache
from llm_serving.engine.runner import ModelRunner, RowPlan, StepPlan

BLOCK = 4
WIDTH = 6  # blocks per row in the static tables: 24 positions
TOLERANCE = 1e-4


def test_buckets_are_powers_of_two_then_the_maximum() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    with pytest.raises(ValueError, match="positive"):
        batch_buckets(0)


def test_a_batch_pads_to_the_smallest_bucket_that_holds_it() -> None:
    buckets = batch_buckets(48)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 32, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    assert bucket_for(49, buckets) is None


def decode_row(token: int, position: int, blocks: tuple[int, ...], **kwargs: Any) -> RowPlan:
    return RowPlan(tokens=(token,), start=position, blocks=blocks, sample=True, **kwargs)


def test_only_decode_only_steps_within_the_tables_are_graphable() -> None:
    row = decode_row(5, 9, (3, 1, 7))
    assert graphable([row, decode_row(6, 0, (2,))], WIDTH, BLOCK)
    assert not graphable([], WIDTH, BLOCK)
    assert not graphable([row, RowPlan((1, 2), 0, (4,), True)], WIDTH, BLOCK)  # a prefill chunk
    assert not graphable([RowPlan((5,), 9, (3, 1, 7), False)], WIDTH, BLOCK)  # not sampled
    assert not graphable([decode_row(5, 9, (3, 1, 7), logprob_targets=(4,))], WIDTH, BLOCK)
    assert not graphable([decode_row(5, 9, (3, 1, 7), adapter="a")], WIDTH, BLOCK)
    assert not graphable([decode_row(5, WIDTH * BLOCK, tuple(range(WIDTH + 1)))], WIDTH, BLOCK)


def test_buffers_hold_the_rows_then_padding_into_the_scratch_block() -> None:
    rows = [decode_row(11, 9, (3, 1, 7, 8)), decode_row(12, 2, (5,))]  # row 0's table is longer than needed
    inputs = decode_inputs(rows, bucket=4, width=WIDTH, block_size=BLOCK, scratch=20)
    assert inputs.tokens == [11, 12, 0, 0]
    assert inputs.positions == [9, 2, 0, 0]
    assert inputs.slots == [7 * BLOCK + 1, 5 * BLOCK + 2, 20 * BLOCK, 20 * BLOCK]
    assert inputs.lengths == [10, 3, 1, 1]
    assert inputs.tables == [3, 1, 7, 3, 3, 3] + [5] * WIDTH + [20] * WIDTH * 2
    assert inputs.flat() == [
        *inputs.tokens,
        *inputs.positions,
        *inputs.slots,
        *inputs.lengths,
        *inputs.tables,
    ]
    with pytest.raises(ValueError, match="do not fit"):
        decode_inputs(rows, bucket=1, width=WIDTH, block_size=BLOCK, scratch=20)
    with pytest.raises(ValueError, match="a decode row at position 9"):  # it needs 3 blocks
        decode_inputs([decode_row(1, 9, (3, 1))], bucket=1, width=WIDTH, block_size=BLOCK, scratch=20)


def test_graphs_apply_on_cuda_without_adapters_unless_switched_off() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_graphs(cuda, EngineConfig())
    assert not uses_graphs(cpu, EngineConfig())
    assert not uses_graphs(cuda, EngineConfig(cuda_graphs=False))
    assert not uses_graphs(cuda, EngineConfig(adapters=(("a", Path("/x")),)))


@pytest.fixture(scope="module")
def model() -> Any:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
    )
    torch.manual_seed(3)
    return LlamaForCausalLM(config).eval()  # type: ignore[no-untyped-call]


PROMPTS = [[5, 9, 17, 3, 44, 2, 8, 100, 7], [1, 2, 3], [60, 61, 62, 63, 64, 65]]
TABLES = [(4, 0, 9), (2,), (7, 1)]
SCRATCH = 12


def prefilled(model: Any) -> tuple[PagedKVCache, ModelRunner]:
    """A zeroed cache of 13 blocks (the last is the scratch block) holding the prompts' KV, and its plain
    runner."""
    cache = PagedKVCache(model, SCRATCH + 1, BLOCK)
    for tensor in (*cache.keys, *cache.values):  # allocated uninitialised: blocks no row uses stay comparable
        tensor.zero_()
    plain = ModelRunner(model, cache)
    plain.execute(
        StepPlan(tuple(RowPlan(tuple(p), 0, t, True) for p, t in zip(PROMPTS, TABLES, strict=True)))
    )
    return cache, plain


def decode_plan() -> StepPlan:
    return StepPlan(
        tuple(decode_row(30 + i, len(p), t) for i, (p, t) in enumerate(zip(PROMPTS, TABLES, strict=True)))
    )


def test_the_eager_graph_runner_gives_the_plain_runners_logits(model: Any) -> None:
    cache, plain = prefilled(model)
    graphs = DecodeGraphs(
        model, cache, max_batch=8, width=WIDTH, scratch=SCRATCH, cuda_kernel=False, capture=False
    )
    assert not graphs.capture_all()
    runner = ModelRunner(model, cache, graphs=graphs)
    through_graphs = runner.execute(decode_plan())
    assert through_graphs.logits.shape == (3, 256)  # 3 rows padded to bucket 4: the padded row is dropped
    assert through_graphs.prompt_logprobs == ([], [], [])
    after_graphs = [k.clone() for k in cache.keys]
    expected = plain.execute(decode_plan())
    torch.testing.assert_close(through_graphs.logits, expected.logits, rtol=TOLERANCE, atol=TOLERANCE)
    for new, final in zip(after_graphs, cache.keys, strict=True):
        # The padded row wrote only the scratch block; the real rows wrote what the plain runner writes.
        assert new[SCRATCH, 0].abs().sum() > 0
        assert not new[SCRATCH, 1:].any()
        torch.testing.assert_close(new[:SCRATCH], final[:SCRATCH], rtol=TOLERANCE, atol=TOLERANCE)


def test_steps_that_are_not_decode_only_run_the_packed_forward(model: Any) -> None:
    cache, plain = prefilled(model)
    graphs = DecodeGraphs(
        model, cache, max_batch=2, width=WIDTH, scratch=SCRATCH, cuda_kernel=False, capture=False
    )
    assert graphs.run(decode_plan()) is None  # 3 rows: more than the largest bucket
    mixed = StepPlan((decode_row(30, len(PROMPTS[1]), TABLES[1]), RowPlan((3, 4, 5), 0, (10, 11), True)))
    assert graphs.run(mixed) is None
    runner = ModelRunner(model, cache, graphs=graphs)
    torch.testing.assert_close(
        runner.execute(mixed).logits, plain.execute(mixed).logits, rtol=TOLERANCE, atol=TOLERANCE
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_graphs_replay_the_eager_logits(model: Any) -> None:
    cuda_model = model.to("cuda")
    try:
        cache, plain = prefilled(cuda_model)
        graphs = DecodeGraphs(
            cuda_model, cache, max_batch=4, width=WIDTH, scratch=SCRATCH, cuda_kernel=False, capture=True
        )
        runner = ModelRunner(cuda_model, cache, graphs=graphs)
        assert runner.capture()
        assert graphs.captured
        assert graphs.capture_seconds > 0
        for _ in range(2):  # replays of the same step give the same logits
            torch.testing.assert_close(
                runner.execute(decode_plan()).logits,
                plain.execute(decode_plan()).logits,
                rtol=TOLERANCE,
                atol=TOLERANCE,
            )
            runner.step_done()
        assert runner.gaps is not None
        assert len(runner.gaps.gaps_ms) >= 1
    finally:
        model.to("cpu")
