"""The continuous-batching scheduler with hand-built requests: no torch, no model."""

from __future__ import annotations

from llm_serving.engine.request import FinishReason, Request, RequestStatus
from llm_serving.engine.scheduler import Scheduler, SchedulerConfig
from llm_serving.sampling.params import SamplingParams, StoppingParams


def req(i: int, prompt: int = 4, new: int = 4) -> Request:
    return Request(i, tuple(range(prompt)), SamplingParams(), StoppingParams(max_new_tokens=new), arrival=0.0)


def test_admits_new_requests_into_the_running_batch_every_step() -> None:
    s = Scheduler(SchedulerConfig(max_batch_total_tokens=100, max_batch_prefill_tokens=100, max_batch_size=8))
    s.add(req(1))
    first = s.schedule()
    assert [r.id for r in first.prefill] == [1]
    assert not first.decode
    s.add(req(2))
    second = s.schedule()
    assert [r.id for r in second.decode] == [1]
    assert [r.id for r in second.prefill] == [2]
    assert second.keep == (0,)
    assert [r.id for r in second.rows] == [1, 2]


def test_finished_and_cancelled_rows_leave_and_keep_indices_follow() -> None:
    s = Scheduler(SchedulerConfig(100, 100, 8))
    for i in range(3):
        s.add(req(i))
    s.schedule()
    s.running[0].finish(FinishReason.LENGTH)
    assert s.cancel(2) is not None
    out = s.schedule()
    assert out.keep == (1,)
    assert [r.id for r in out.decode] == [1]
    assert {r.id for r in out.removed} == {0, 2}
    assert s.cancel(99) is None


def test_token_budget_holds_requests_back_until_room_frees() -> None:
    s = Scheduler(SchedulerConfig(max_batch_total_tokens=16, max_batch_prefill_tokens=100, max_batch_size=8))
    for i in range(3):
        s.add(req(i, prompt=4, new=4))  # 8 tokens each
    out = s.schedule()
    assert [r.id for r in out.prefill] == [0, 1]
    assert len(s.waiting) == 1
    s.running[0].finish(FinishReason.EOS_TOKEN)
    assert [r.id for r in s.schedule().prefill] == [2]


def test_prefill_budget_and_batch_size() -> None:
    s = Scheduler(SchedulerConfig(max_batch_total_tokens=1000, max_batch_prefill_tokens=10, max_batch_size=3))
    for i in range(5):
        s.add(req(i, prompt=6))
    assert [r.id for r in s.schedule().prefill] == [0]  # the second prompt would exceed the prefill budget
    assert [r.id for r in s.schedule().prefill] == [1]
    assert [r.id for r in s.schedule().prefill] == [2]
    assert s.schedule().prefill == ()  # batch full
    assert all(r.status is RequestStatus.RUNNING for r in s.running)


def test_cancel_waiting_request() -> None:
    s = Scheduler(SchedulerConfig(8, 100, 8))
    s.add(req(1))
    s.add(req(2))
    s.schedule()
    cancelled = s.cancel(2)
    assert cancelled is not None
    assert cancelled.status is RequestStatus.CANCELLED
    assert not s.waiting
