"""WorkQueue: dedup, per-key exclusion, re-queue of keys added while active, delayed adds."""

from __future__ import annotations

import asyncio

from llm_operator.workqueue import WorkQueue


async def test_duplicates_collapse() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for key in ("a", "b", "a", "a"):
        queue.add(key)
    assert len(queue) == 2
    assert await queue.get() == "a"
    assert await queue.get() == "b"


async def test_key_added_while_active_runs_again_after() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    key = await queue.get()
    queue.add("a")  # an event during the pass
    assert len(queue) == 0  # not handed to a second worker meanwhile
    queue.done(key)
    assert len(queue) == 1
    assert await queue.get() == "a"
    queue.done("a")
    assert queue.idle


async def test_add_after() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("a", 0.01)
    queue.add_after("a", 10)  # the earlier timer is kept
    assert not queue.idle
    assert await asyncio.wait_for(queue.get(), 1) == "a"
    queue.done("a")
    assert queue.idle
