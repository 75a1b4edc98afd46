"""Where the autoscaler reads request metrics: the gateways' `/metrics` (static URLs, or the ready gateway
pods found by label) or a Prometheus server's `/api/v1/query`. The I/O; `readings.py` parses what comes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from llm_operator.autoscale.readings import (
    GATEWAY_SELECTOR,
    MetricsUnavailable,
    Reading,
    Series,
    in_flight_query,
    last_request_query,
    merge,
    parse_gateway_metrics,
    prometheus_reading,
    prometheus_vector,
    require_scraped,
    up_query,
)
from llm_operator.autoscale.rules import gateway_metrics_urls
from llm_operator.errors import OperatorError
from llm_operator.kube import Kube
from llm_operator.objects import Key

UrlLister = Callable[[], Awaitable[list[str]]]
READ_ERRORS = (aiohttp.ClientError, TimeoutError, MetricsUnavailable, OperatorError)
"""What a source raises when the metrics cannot be read this tick: HTTP and connection failures, timeouts,
answers that do not parse, and the Kubernetes errors of listing the gateway pods. Anything else is a bug."""


class MetricsSource(Protocol):
    async def read(self, session: aiohttp.ClientSession) -> dict[Key, Reading]:
        """Current readings; raises one of `READ_ERRORS` when incomplete."""


async def _text(answer: aiohttp.ClientResponse) -> str:
    try:
        return await answer.text()
    except UnicodeDecodeError as error:
        raise MetricsUnavailable(f"{answer.url} answered undecodable text: {error}") from error


@dataclass(frozen=True)
class GatewaySource:
    """Scrape every gateway: `urls()` lists their metrics URLs; one failure fails the whole reading."""

    urls: UrlLister
    """An async callable returning the metrics URLs (see `static_urls` and `gateway_pod_urls`)."""

    async def read(self, session: aiohttp.ClientSession) -> dict[Key, Reading]:
        urls = await self.urls()
        if not urls:
            raise MetricsUnavailable("no gateway to read metrics from")

        async def one(url: str) -> dict[Key, Reading]:
            async with session.get(url) as answer:
                answer.raise_for_status()
                return parse_gateway_metrics(await _text(answer))

        return merge(await asyncio.gather(*(one(u) for u in urls)))


def static_urls(urls: Sequence[str]) -> UrlLister:
    async def listed() -> list[str]:
        return list(urls)

    return listed


def gateway_pod_urls(kube: Kube, namespace: str, labels: Mapping[str, str], port: int) -> UrlLister:
    """The metrics URLs of the ready gateway pods."""

    async def found() -> list[str]:
        return gateway_metrics_urls(await kube.list("v1", "Pod", namespace, labels=dict(labels)), port)

    return found


@dataclass(frozen=True)
class PrometheusSource:
    """Read the gateways' metrics through a Prometheus server's HTTP API (`/api/v1/query`).

    In flight: the latest scraped value summed over gateway replicas (the decision averages its own samples
    over the window, as with `GatewaySource`); last request: the latest over gateway replicas. The reading
    is refused (like `GatewaySource` when one gateway does not answer) when Prometheus scrapes no gateway or
    cannot scrape one (`up == 0`): missing series must not read as "no requests".
    """

    base_url: str
    selector: str = GATEWAY_SELECTOR
    """Label matchers picking the gateways' targets, e.g. `job="llm-endpoints-gateway"`."""

    async def _query(self, session: aiohttp.ClientSession, query: str) -> list[Series]:
        url = f"{self.base_url.rstrip('/')}/api/v1/query"
        async with session.get(url, params={"query": query}) as answer:
            text = await _text(answer)
            status = answer.status
        return prometheus_vector(url, query, status, text)

    async def read(self, session: aiohttp.ClientSession) -> dict[Key, Reading]:
        require_scraped(await self._query(session, up_query(self.selector)), self.base_url, self.selector)
        in_flight = await self._query(session, in_flight_query(self.selector))
        last = await self._query(session, last_request_query(self.selector))
        return prometheus_reading(in_flight, last)
