"""Process group setup under torchrun, and the step-plan broadcast from rank 0 to the other ranks."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from llm_serving.engine.runner import ModelRunner, StepPlan

# Ranks other than 0 wait in a broadcast while the server is idle; they must not time out.
IDLE_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    group: dist.ProcessGroup | None

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    """Join torchrun's group (NCCL on GPU, gloo on CPU) plus a gloo group for plans; a no-op alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1:
        return DistContext(rank=0, world_size=1, local_rank=0, group=None)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=IDLE_TIMEOUT)
    group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if cuda else None
    assert group is None or isinstance(group, dist.ProcessGroup)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, group=group)


def plan_broadcaster(ctx: DistContext) -> Callable[[StepPlan | None], None] | None:
    """Rank 0's sender, or None when running alone."""
    if ctx.world_size == 1:
        return None

    def send(plan: StepPlan | None) -> None:
        dist.broadcast_object_list([plan], src=0, group=ctx.group)

    return send


def follow_plans(ctx: DistContext, runner: ModelRunner) -> None:
    """Loop of ranks other than 0: execute each broadcast plan until rank 0 sends None."""
    while True:
        box: list[StepPlan | None] = [None]
        dist.broadcast_object_list(box, src=0, group=ctx.group)
        plan = box[0]
        if plan is None:
            return
        runner.execute(plan)
