"""KV-cache block allocator with reference counts and an automatic prefix cache. Pure: no torch.

A full block of tokens is identified by a chained hash: sha256 of the previous block's hash and this block's
token ids, so equal contents after different prefixes never match. A LoRA adapter's chains start from a root
of that adapter's own (`chain_root`): its K/V differ from the base model's and other adapters'. Unreferenced
blocks that hold a hashed prefix stay cached and are evicted least recently released first, only when no truly
free block is left.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class NoFreeBlocks(Exception):
    """Every block is referenced by a request."""


@dataclass(frozen=True)
class BlockStats:
    """A snapshot of the pool, for metrics."""

    num_blocks: int
    block_size: int
    used: int  # blocks referenced by requests
    cached: int  # unreferenced blocks still holding a reusable prefix (evictable, LRU)
    prefix_queries: int  # prompt tokens looked up in the prefix cache, cumulative
    prefix_hits: int  # of those, tokens found, cumulative

    @property
    def usage(self) -> float:
        """Fraction of the blocks referenced by requests (vLLM's kv_cache_usage_perc)."""
        return self.used / self.num_blocks if self.num_blocks else 0.0


def chain_root(adapter: str | None) -> bytes:
    """The parent of a sequence's first block: empty for the base model, a hash of the adapter's name else."""
    return b"" if adapter is None else hashlib.sha256(b"lora:" + adapter.encode()).digest()


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The chained hash of one full block: it depends on every token before it through `parent`."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


class BlockPool:
    """Fixed-size blocks, refcounted; a block is free, used (refs > 0) or cached (refs == 0, hashed)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a block pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # A stack: the most recently released block is reused first, so touched memory stays small.
        self._free = list(reversed(range(num_blocks)))
        self._refs = [0] * num_blocks
        self._used = 0
        self._by_hash: dict[bytes, int] = {}  # hash -> the block that serves it
        self._hash_of: dict[int, bytes] = {}  # block -> hash of its contents (also for duplicates)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recent first
        self._queries = 0
        self._hits = 0

    def free_count(self) -> int:
        """Blocks allocatable now: truly free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    def available_with(self, blocks: Sequence[int]) -> int:
        """Blocks still allocatable once `blocks` (e.g. a prefix match) are referenced too."""
        return self.free_count() - sum(1 for b in set(blocks) if self._refs[b] == 0)

    def allocate(self) -> int:
        """A block with one reference: a free one, else the least recently released cached one."""
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
        else:
            raise NoFreeBlocks
        self._take(block)
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block; at zero a cached block becomes evictable, others free.

        Blocks are released last first, so a sequence's tail is evicted before the prefix it extends.
        """
        for block in reversed(blocks):
            if self._refs[block] <= 0:
                raise ValueError(f"block {block} released more often than referenced")
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            self._used -= 1
            digest = self._hash_of.get(block)
            if digest is not None and self._by_hash.get(digest) == block:
                self._evictable[block] = None
            else:
                self._hash_of.pop(block, None)
                self._free.append(block)

    def lookup(self, tokens: Sequence[int], adapter: str | None = None) -> list[int]:
        """The cached full blocks covering the longest prefix of `tokens` (run with `adapter`); changes
        nothing."""
        found: list[int] = []
        if not self.prefix_caching:
            return found
        for digest in self._chain(tokens, chain_root(adapter), 0):
            block = self._by_hash.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def match_prefix(self, tokens: Sequence[int], adapter: str | None = None) -> list[int]:
        """Reference and return the cached full blocks covering the longest prefix of `tokens`."""
        if not self.prefix_caching:
            return []
        found = self.lookup(tokens, adapter)
        for block in found:
            self._take(block)
        self._queries += len(tokens)
        self._hits += len(found) * self.block_size
        return found

    def register(self, tokens: Sequence[int], blocks: Sequence[int], adapter: str | None = None) -> None:
        """Hash each full block of `tokens` (held in `blocks`, in order, computed with `adapter`) so later
        requests can reuse it.

        Blocks hashed before are skipped: only the chain after the last known block is computed.
        """
        if not self.prefix_caching:
            return
        full = min(len(tokens) // self.block_size, len(blocks))
        first = full
        while first > 0 and blocks[first - 1] not in self._hash_of:
            first -= 1
        parent = self._hash_of[blocks[first - 1]] if first else chain_root(adapter)
        for index, digest in enumerate(self._chain(tokens[: full * self.block_size], parent, first), first):
            block = blocks[index]
            self._hash_of[block] = digest
            self._by_hash.setdefault(digest, block)

    def stats(self) -> BlockStats:
        return BlockStats(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            used=self._used,
            cached=len(self._evictable),
            prefix_queries=self._queries,
            prefix_hits=self._hits,
        )

    def _chain(self, tokens: Sequence[int], parent: bytes, first: int) -> Iterator[bytes]:
        """Chained hashes of the full blocks of `tokens` from block index `first` on, lazily."""
        size = self.block_size
        for start in range(first * size, len(tokens) - size + 1, size):
            parent = block_hash(parent, tokens[start : start + size])
            yield parent

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            self._used += 1
            self._evictable.pop(block, None)
        self._refs[block] += 1

    def _forget(self, block: int) -> None:
        digest = self._hash_of.pop(block)
        if self._by_hash.get(digest) == block:
            del self._by_hash[digest]
