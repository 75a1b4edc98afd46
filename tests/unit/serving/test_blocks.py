"""The KV block pool: allocation, reference counts, chained prefix hashes and LRU eviction. No torch."""

from __future__ import annotations

import pytest

from llm_serving.engine.blocks import BlockPool, NoFreeBlocks

BS = 4


def filled(pool: BlockPool, tokens: tuple[int, ...]) -> list[int]:
    """Allocate blocks for `tokens` and register them, as a request that computed them would."""
    blocks = [pool.allocate() for _ in range(-(-len(tokens) // pool.block_size))]
    pool.register(tokens, blocks)
    return blocks


def test_allocates_in_order_reuses_the_last_released_and_runs_out() -> None:
    pool = BlockPool(num_blocks=3, block_size=BS)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert pool.free_count() == 0
    with pytest.raises(NoFreeBlocks):
        pool.allocate()
    pool.release([0])
    pool.release([2])
    assert pool.allocate() == 2  # last released first: touched memory stays small
    assert pool.allocate() == 0
    assert pool.stats().used == 3


def test_reference_counts_keep_shared_blocks_until_the_last_release() -> None:
    pool = BlockPool(num_blocks=4, block_size=BS)
    prompt = tuple(range(9))  # two full blocks and a partial one
    owner = filled(pool, prompt)
    shared = pool.match_prefix(prompt)
    assert shared == owner[:2]  # only full blocks are shared
    pool.release(owner)
    stats = pool.stats()
    assert (stats.used, stats.cached) == (2, 0)  # the sharer still holds both full blocks
    assert pool.free_count() == 2
    pool.release(shared)
    stats = pool.stats()
    assert (stats.used, stats.cached) == (0, 2)
    assert pool.free_count() == 4
    with pytest.raises(ValueError, match="released more often"):
        pool.release(shared[:1] + shared[:1])  # once is fine (it is cached), the second is a bug


def test_equal_block_contents_after_different_prefixes_do_not_match() -> None:
    pool = BlockPool(num_blocks=8, block_size=BS)
    filled(pool, (1, 2, 3, 4, 9, 9, 9, 9))
    assert len(pool.lookup((1, 2, 3, 4, 9, 9, 9, 9, 5))) == 2
    assert pool.lookup((7, 7, 7, 7, 9, 9, 9, 9)) == []  # same second block, other first block
    assert len(pool.lookup((1, 2, 3, 4, 9, 9, 9, 8))) == 1  # diverges inside the second block
    filled(pool, (5, 5, 5, 5, 8, 8, 8, 8))
    filled(pool, (6, 6, 6, 6))
    # The first block is cached, the second's contents are too but after another first block.
    assert len(pool.lookup((6, 6, 6, 6, 8, 8, 8, 8))) == 1


def test_prefix_queries_and_hits_are_counted_in_tokens() -> None:
    pool = BlockPool(num_blocks=8, block_size=BS)
    filled(pool, tuple(range(8)))
    pool.match_prefix(tuple(range(11)))  # 11 tokens asked, 8 found
    pool.match_prefix((5, 5, 5))  # 3 asked, shorter than a block
    assert pool.lookup(tuple(range(8))) != []  # lookups are not queries
    stats = pool.stats()
    assert (stats.prefix_queries, stats.prefix_hits) == (14, 8)


def test_free_blocks_go_before_cached_ones_and_cached_ones_leave_least_recent_first() -> None:
    pool = BlockPool(num_blocks=5, block_size=BS)
    first = filled(pool, tuple(range(8)))  # blocks 0, 1
    second = filled(pool, tuple(range(100, 108)))  # blocks 2, 3
    pool.release(first)
    pool.release(second)
    assert pool.stats().cached == 4
    assert pool.allocate() == 4  # the never used block, before any cached one
    # Least recently released first; within a sequence its tail before the prefix it extends.
    assert pool.allocate() == first[1]
    assert len(pool.lookup(tuple(range(8)))) == 1
    assert pool.allocate() == first[0]
    assert pool.lookup(tuple(range(8))) == []
    assert pool.lookup(tuple(range(100, 108))) == second
    assert pool.stats().cached == 2


def test_a_matched_cached_block_is_no_longer_evictable() -> None:
    pool = BlockPool(num_blocks=2, block_size=BS)
    pool.release(filled(pool, tuple(range(8))))
    held = pool.match_prefix(tuple(range(5)))
    assert held == [0]
    assert pool.available_with(held) == 1
    assert pool.allocate() == 1
    with pytest.raises(NoFreeBlocks):
        pool.allocate()


def test_available_with_counts_the_cached_blocks_a_match_would_take() -> None:
    pool = BlockPool(num_blocks=4, block_size=BS)
    pool.release(filled(pool, tuple(range(8))))
    hit = pool.lookup(tuple(range(9)))
    assert pool.free_count() == 4
    assert pool.available_with(hit) == 2


def test_register_only_hashes_full_blocks_and_keeps_the_first_copy() -> None:
    pool = BlockPool(num_blocks=6, block_size=BS)
    tokens = tuple(range(6))
    first = [pool.allocate(), pool.allocate()]
    pool.register(tokens, first)
    assert pool.lookup(tuple(range(12))) == first[:1]
    pool.register(tuple(range(8)), first)  # the second block is now full: extend the chain
    assert pool.lookup(tuple(range(12))) == first
    duplicate = [pool.allocate(), pool.allocate()]  # computed again beside the first copy
    pool.register(tuple(range(8)), duplicate)
    assert pool.lookup(tuple(range(8))) == first
    pool.release(duplicate)
    assert pool.stats().cached == 0  # duplicates are plain free blocks once released
    assert pool.free_count() == 4


def test_without_prefix_caching_nothing_matches() -> None:
    pool = BlockPool(num_blocks=4, block_size=BS, prefix_caching=False)
    blocks = filled(pool, tuple(range(8)))
    assert pool.match_prefix(tuple(range(8))) == []
    pool.release(blocks)
    stats = pool.stats()
    assert (stats.cached, stats.prefix_queries, pool.free_count()) == (0, 0, 4)


def test_usage_is_the_referenced_fraction() -> None:
    pool = BlockPool(num_blocks=4, block_size=BS)
    pool.allocate()
    assert pool.stats().usage == 0.25
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(num_blocks=0, block_size=BS)


def test_blocks_computed_with_a_lora_adapter_serve_only_that_adapter() -> None:
    pool = BlockPool(num_blocks=8, block_size=BS)
    tokens = (1, 2, 3, 4, 5, 6, 7, 8)
    blocks = [pool.allocate() for _ in range(2)]
    pool.register(tokens, blocks, adapter="alpha")
    assert pool.lookup(tokens, "alpha") == blocks
    assert pool.lookup(tokens) == []  # the base model's K/V differ
    assert pool.lookup(tokens, "beta") == []
    base = filled(pool, tokens)
    assert pool.lookup(tokens) == base
    assert pool.lookup(tokens, "alpha") == blocks
