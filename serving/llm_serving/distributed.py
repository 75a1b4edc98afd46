"""Process groups under torchrun, the step-plan broadcast from rank 0, and the collective timeouts.

Timeouts: a follower waits for the next plan without limit (the server may be idle for days), but every wait
of rank 0, and every collective inside a step, is bounded by `DistSettings.work_timeout`: a rank that fails
or hangs in a step ends the step with an error on the others instead of a 365-day wait. A follower whose step
fails exits at once (non-zero), which closes its connections, so rank 0 sees the error within milliseconds.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from llm_serving.config import DistSettings, launch_ranks
from llm_serving.engine.runner import ModelRunner, StepPlan

log = logging.getLogger("llm_serving.distributed")

IDLE_TIMEOUT = timedelta(days=365)
"""Followers wait this long for a plan (and every rank for the others at start-up): effectively forever."""


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    group: dist.ProcessGroup | None
    """The gloo group plans travel on (None alone); the model's collectives use the default group."""
    settings: DistSettings = field(default_factory=DistSettings)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def init_distributed(settings: DistSettings | None = None) -> DistContext:
    """Join torchrun's group (NCCL on GPU, gloo on CPU) plus a gloo group for plans; a no-op alone."""
    settings = settings or DistSettings()
    ranks = launch_ranks()
    rank, world, local_rank = ranks.rank, ranks.world_size, ranks.local_rank
    if world == 1:
        return DistContext(rank=0, world_size=1, local_rank=0, group=None, settings=settings)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=IDLE_TIMEOUT)
    group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    assert isinstance(group, dist.ProcessGroup)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, group=group, settings=settings)


def agree_num_blocks(ctx: DistContext, num_blocks: int) -> int:
    """The smallest KV block count over the ranks, so that every rank's cache has the same blocks."""
    if ctx.world_size == 1:
        return num_blocks
    value = torch.tensor([num_blocks], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=ctx.group)
    return int(value.item())


def all_ranks(ctx: DistContext, ok: bool) -> bool:
    """Whether `ok` holds on every rank (each one calls this, in the same order)."""
    if ctx.world_size == 1:
        return ok
    value = torch.tensor([int(ok)], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=ctx.group)
    return bool(value.item())


def _bound_step_collectives(ctx: DistContext) -> None:
    """From now on the model's collectives (the default group) give up after the work timeout."""
    dist.set_timeout(ctx.settings.work_timeout)


def plan_broadcaster(ctx: DistContext) -> Callable[[StepPlan | None], None] | None:
    """Rank 0's sender, or None when running alone. Rank 0 only waits on the others while it has work, so
    from its first plan on all its collectives are bounded (after the start-up agreement, which is not)."""
    if ctx.world_size == 1:
        return None
    group = ctx.group
    bounded = False

    def send(plan: StepPlan | None) -> None:
        nonlocal bounded
        if not bounded:
            _bound_step_collectives(ctx)
            dist.set_timeout(ctx.settings.work_timeout, group)
            bounded = True
        dist.broadcast_object_list([plan], src=0, group=group)

    return send


def follow_plans(ctx: DistContext, runner: ModelRunner) -> None:
    """Loop of ranks other than 0: execute each broadcast plan until rank 0 sends None. A failure (this
    rank's step, or rank 0 gone) ends the process at once with status 1."""
    _bound_step_collectives(ctx)
    try:
        while True:
            box: list[StepPlan | None] = [None]
            dist.broadcast_object_list(box, src=0, group=ctx.group)
            plan = box[0]
            if plan is None:
                return
            runner.execute(plan)
    except Exception:
        log.exception("rank %d: step failed; exiting so that rank 0 stops waiting", ctx.rank)
        _exit_now(1)


def _exit_now(status: int) -> NoReturn:
    """Exit without Python's shutdown, which can keep the process group's sockets open for a while."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
