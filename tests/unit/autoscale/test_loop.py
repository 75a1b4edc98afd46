"""The loop's error handling: unreadable metrics keep every replica, a bug is logged with its traceback."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import pytest
from prometheus_client import REGISTRY

from llm_devstack.ports import free_port
from llm_operator.autoscale.loop import AutoscalerSettings, run_autoscaler
from llm_operator.autoscale.readings import MetricsUnavailable, Reading
from llm_operator.kube import Credentials, Kube
from llm_operator.objects import Key


class FailingSource:
    """A source whose every read raises `error`; `enough` is set after `count` reads."""

    def __init__(self, error: Exception, count: int) -> None:
        self.error, self.count, self.reads = error, count, 0
        self.enough = asyncio.Event()

    async def read(self, session: aiohttp.ClientSession) -> dict[Key, Reading]:
        self.reads += 1
        if self.reads >= self.count:
            self.enough.set()
        raise self.error


def _read_failures() -> float:
    return REGISTRY.get_sample_value("llm_operator_autoscaler_metrics_read_failures_total") or 0.0


async def _ticks(source: FailingSource) -> None:
    """Run the loop (against an API server that is not there) until the source has read enough times."""
    kube = Kube(Credentials(server=f"http://127.0.0.1:{free_port()}"), timeout=2.0)
    async with kube:
        loop = asyncio.create_task(run_autoscaler(kube, source, AutoscalerSettings(interval=0.01)))
        try:
            await asyncio.wait_for(source.enough.wait(), timeout=30)
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop


async def test_unreadable_metrics_are_counted_and_every_endpoint_keeps_its_replicas(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="llm_operator.autoscale")
    before = _read_failures()
    await _ticks(FailingSource(MetricsUnavailable("no gateway to read metrics from"), 2))
    assert _read_failures() >= before + 2
    unavailable = [r for r in caplog.records if "request metrics unavailable" in r.getMessage()]
    assert "MetricsUnavailable: no gateway to read metrics from" in unavailable[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_bug_in_a_source_is_not_read_as_missing_metrics(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="llm_operator.autoscale")
    before = _read_failures()
    await _ticks(FailingSource(KeyError("data"), 2))  # the loop goes on after it
    assert _read_failures() == before
    assert not [r for r in caplog.records if "request metrics unavailable" in r.getMessage()]
    bugs = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(bugs) >= 2
    assert bugs[0].exc_info is not None
    assert bugs[0].exc_info[0] is KeyError
