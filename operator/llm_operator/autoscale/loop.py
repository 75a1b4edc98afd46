"""The autoscaler's I/O: every few seconds read request metrics, decide, and write Deployment replicas.

Metrics come from the gateways' `/metrics` on their admin port (static URLs, or the ready gateway pods found
by label) or from a Prometheus server's `/api/v1/query`. Writes: only the Deployment's `spec.replicas` (a
merge patch of the Deployment itself, not of its `scale` subresource, whose Scale object carries no labels for
the chart's ValidatingAdmissionPolicy to check; as the autoscaler's field manager, guarded by the
Deployment's resourceVersion) and the endpoint's `status.lastRequestTime`.
Runs in the operator while its replica leads (`run_autoscaler(..., leading=controller.leading)`). A tick
whose read fails (a gateway or Prometheus not answering, a gateway target down) changes no replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import pydantic
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from llm_operator.api.v1alpha1 import API_VERSION, KIND, LLMEndpoint
from llm_operator.autoscale.decide import Decision, Policy, Sample, Tuning, Window, desired_replicas
from llm_operator.errors import ConflictError, NotFoundError, OperatorError
from llm_operator.gateway.metrics import IN_FLIGHT, LAST_REQUEST
from llm_operator.kube import Kube
from llm_operator.settings import AUTOSCALER_FIELD_MANAGER, MANAGED_BY

Key = tuple[str, str]
UrlLister = Callable[[], Awaitable[list[str]]]
Manifest = dict[str, Any]
log = logging.getLogger("llm_operator.autoscale")
SCALINGS = Counter("llm_operator_autoscaler_scalings", "Replica changes written", ["direction"])
READ_FAILURES = Counter(
    "llm_operator_autoscaler_metrics_read_failures", "Ticks whose request metrics could not be read"
)


@dataclass(frozen=True)
class Reading:
    """One endpoint's request metrics, all gateways together."""

    in_flight: float = 0.0
    last_request: float | None = None


class MetricsSource(Protocol):
    async def read(self, session: aiohttp.ClientSession) -> dict[Key, Reading]:
        """Current readings; raises (aiohttp.ClientError, TimeoutError, ValueError) when incomplete."""


def merge(readings: Sequence[Mapping[Key, Reading]]) -> dict[Key, Reading]:
    """Sum in-flight and take the latest request time across gateways."""
    out: dict[Key, Reading] = {}
    for reading in readings:
        for key, r in reading.items():
            prev = out.get(key, Reading())
            last = max((t for t in (prev.last_request, r.last_request) if t is not None), default=None)
            out[key] = Reading(prev.in_flight + r.in_flight, last)
    return out


def parse_gateway_metrics(text: str) -> dict[Key, Reading]:
    """A gateway's `/metrics` text -> readings by endpoint."""
    in_flight: dict[Key, float] = {}
    last: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.labels.get("namespace", ""), sample.labels.get("endpoint", ""))
            if sample.name == IN_FLIGHT:
                in_flight[key] = in_flight.get(key, 0.0) + sample.value
            elif sample.name == LAST_REQUEST:
                last[key] = max(last.get(key, 0.0), sample.value)
    return {k: Reading(in_flight.get(k, 0.0), last.get(k)) for k in in_flight.keys() | last.keys()}


@dataclass(frozen=True)
class GatewaySource:
    """Scrape every gateway: `urls()` lists their metrics URLs; one failure fails the whole reading."""

    urls: UrlLister
    """An async callable returning the metrics URLs (see `static_urls` and `gateway_pod_urls`)."""

    async def read(self, session: aiohttp.ClientSession) -> dict[Key, Reading]:
        urls = await self.urls()
        if not urls:
            raise ValueError("no gateway to read metrics from")

        async def one(url: str) -> dict[Key, Reading]:
            async with session.get(url) as answer:
                answer.raise_for_status()
                return parse_gateway_metrics(await answer.text())

        return merge(await asyncio.gather(*(one(u) for u in urls)))


def static_urls(urls: Sequence[str]) -> UrlLister:
    async def listed() -> list[str]:
        return list(urls)

    return listed


def gateway_pod_urls(kube: Kube, namespace: str, labels: Mapping[str, str], port: int) -> UrlLister:
    """The metrics URLs of the ready gateway pods."""

    async def found() -> list[str]:
        pods = await kube.list("v1", "Pod", namespace, labels=dict(labels))
        return [
            f"http://{pod['status']['podIP']}:{port}/metrics"
            for pod in pods
            if pod.get("status", {}).get("podIP")
            and any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in pod["status"].get("conditions") or ()
            )
        ]

    return found


GATEWAY_SELECTOR = 'job=~".*gateway.*"'
"""Label matchers of the gateways' scrape targets in Prometheus (the chart's ServiceMonitor names the job
after the gateway Service, `<release>-gateway`)."""


def gateway_series(metric: str, selector: str = GATEWAY_SELECTOR) -> str:
    """PromQL for a gateway metric with the gateway's own `namespace` and `endpoint` labels.

    Without `honor_labels`, Prometheus keeps a scrape target's labels and renames clashing ones from the
    scraped series to `exported_<name>`: the Prometheus Operator gives every target `namespace` (the
    gateway's) and `endpoint` (the port name), so the endpoint's labels arrive as `exported_namespace` and
    `exported_endpoint`. Copying those back makes the queries right with `honor_labels` on or off.
    """
    expression = f"{metric}{{{selector}}}"
    for label in ("namespace", "endpoint"):
        expression = f'label_replace({expression}, "{label}", "$1", "exported_{label}", "(.+)")'
    return expression


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

    async def _query(self, session: aiohttp.ClientSession, query: str) -> list[dict[str, Any]]:
        url = f"{self.base_url.rstrip('/')}/api/v1/query"
        async with session.get(url, params={"query": query}) as answer:
            text = await answer.text()
            status = answer.status
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if not isinstance(body, dict) or status != 200 or body.get("status") != "success":
            detail = (
                f"{body.get('errorType', 'error')}: {body.get('error')}"
                if isinstance(body, dict) and body.get("error")
                else text.strip()[:200] or "empty answer"
            )
            raise ValueError(f"prometheus {url} answered HTTP {status} to {query!r}: {detail}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def _by_endpoint(self, session: aiohttp.ClientSession, query: str) -> dict[Key, float]:
        return {
            (r["metric"].get("namespace", ""), r["metric"].get("endpoint", "")): float(r["value"][1])
            for r in await self._query(session, query)
        }

    async def read(self, session: aiohttp.ClientSession) -> dict[Key, Reading]:
        up = await self._query(session, f"up{{{self.selector}}}")
        if not up:
            raise ValueError(
                f"prometheus {self.base_url} scrapes no gateway (no series up{{{self.selector}}})"
            )
        if down := sorted(r["metric"].get("instance", "?") for r in up if float(r["value"][1]) != 1):
            raise ValueError(
                f"prometheus {self.base_url} cannot scrape gateway(s) {', '.join(down)} (up == 0)"
            )
        in_flight = await self._by_endpoint(
            session, f"sum by (namespace, endpoint) ({gateway_series(IN_FLIGHT, self.selector)})"
        )
        last = await self._by_endpoint(
            session, f"max by (namespace, endpoint) ({gateway_series(LAST_REQUEST, self.selector)})"
        )
        return {k: Reading(in_flight.get(k, 0.0), last.get(k)) for k in in_flight.keys() | last.keys()}


@dataclass(frozen=True)
class AutoscalerSettings:
    interval: float = 5.0
    """Seconds between ticks."""
    tuning: Tuning = field(default_factory=Tuning)
    status_every: float = 10.0
    """status.lastRequestTime is rewritten when the gateways' value is at least this much newer."""
    scrape_timeout: float = 3.0
    namespaces: tuple[str, ...] = ()
    """Namespaces whose endpoints it scales, as the operator watches them; empty means all."""


def _unix(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Autoscaler:
    """Keeps the sample history between ticks; `tick(now)` does one read-decide-write round."""

    def __init__(
        self, kube: Kube, source: MetricsSource, settings: AutoscalerSettings, started: float
    ) -> None:
        self.kube, self.source, self.settings, self.started = kube, source, settings, started
        self.history: dict[Key, deque[Sample]] = {}

    async def _list(
        self, api_version: str, kind: str, labels: dict[str, str] | None = None
    ) -> list[Manifest]:
        """Objects in the namespaces it scales (one cluster-wide list when it scales all)."""
        if not self.settings.namespaces:
            return await self.kube.list(api_version, kind, labels=labels)
        listed = [
            await self.kube.list(api_version, kind, ns, labels=labels) for ns in self.settings.namespaces
        ]
        return [item for items in listed for item in items]

    async def tick(self, session: aiohttp.ClientSession, now: float) -> dict[Key, Decision]:
        try:
            readings: dict[Key, Reading] | None = await self.source.read(session)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, OperatorError) as error:
            READ_FAILURES.inc()
            log.warning(
                "request metrics unavailable, every endpoint keeps its replicas this tick: %s: %s",
                type(error).__name__,
                error,
            )
            readings = None
        endpoints = await self._list(API_VERSION, KIND)
        deployments = {
            (d["metadata"]["namespace"], d["metadata"]["name"]): d
            for d in await self._list("apps/v1", "Deployment", labels=dict(MANAGED_BY))
        }
        decisions: dict[Key, Decision] = {}
        seen: set[Key] = set()
        for body in endpoints:
            key = (body["metadata"]["namespace"], body["metadata"]["name"])
            seen.add(key)
            reading = (readings or {}).get(key, Reading())
            if readings is not None:
                self._record(key, Sample(now, reading.in_flight), now)
            if (deployment := deployments.get(key)) is None or body["metadata"].get("deletionTimestamp"):
                continue
            try:
                endpoint = LLMEndpoint.model_validate(body)
            except pydantic.ValidationError:
                continue
            decisions[key] = await self._act(endpoint, deployment, reading, now, fresh=readings is not None)
        for gone in self.history.keys() - seen:
            del self.history[gone]
        return decisions

    def _record(self, key: Key, sample: Sample, now: float) -> None:
        samples = self.history.setdefault(key, deque())
        samples.append(sample)
        while samples and samples[0].at < now - self.settings.tuning.history:
            samples.popleft()

    def _idle_since(self, deployment: Manifest, current: int, now: float) -> float:
        """Where idleness starts counting: not before the replicas became available (a replica still
        loading its model has had no chance to serve), nor before creation or this autoscaler's start."""
        status = deployment.get("status") or {}
        if current > 0 and not status.get("readyReplicas"):
            return now
        available: Manifest = next(
            (
                c
                for c in status.get("conditions") or ()
                if c.get("type") == "Available" and c.get("status") == "True"
            ),
            {},
        )
        moments = (deployment["metadata"].get("creationTimestamp"), available.get("lastTransitionTime"))
        return max([self.started, *(t for t in map(_unix, moments) if t is not None)])

    async def _act(
        self, endpoint: LLMEndpoint, deployment: Manifest, reading: Reading, now: float, *, fresh: bool
    ) -> Decision:
        """Decide and write; without a `fresh` reading the decision sees no samples, so it keeps the count
        (missing metrics are never read as an idle endpoint)."""
        meta = endpoint.metadata
        key = (meta.namespace, meta.name)
        status_last = (
            endpoint.status.last_request_time.timestamp() if endpoint.status.last_request_time else None
        )
        last = max((t for t in (reading.last_request, status_last) if t is not None), default=None)
        current = int(deployment.get("spec", {}).get("replicas", 1))
        samples = tuple(self.history.get(key, ())) if fresh else ()
        window = Window(samples, last, self._idle_since(deployment, current, now))
        decision = desired_replicas(
            window, Policy.from_spec(endpoint.spec), current, now, self.settings.tuning
        )
        ref = {"namespace": meta.namespace, "endpoint": meta.name}
        if decision.replicas != current:
            try:
                await self.kube.merge_patch(
                    "apps/v1",
                    "Deployment",
                    meta.namespace,
                    meta.name,
                    {
                        "metadata": {"resourceVersion": deployment["metadata"]["resourceVersion"]},
                        "spec": {"replicas": decision.replicas},
                    },
                    field_manager=AUTOSCALER_FIELD_MANAGER,
                )
                SCALINGS.labels(direction="up" if decision.replicas > current else "down").inc()
                log.info("scaled %d -> %d: %s", current, decision.replicas, decision.reason, extra=ref)
            except (ConflictError, NotFoundError):
                log.debug("Deployment changed meanwhile; deciding again next tick", extra=ref)
        if reading.last_request is not None and (
            status_last is None or reading.last_request - status_last >= self.settings.status_every
        ):
            await self._write_last_request(endpoint, reading.last_request)
        return decision

    async def _write_last_request(self, endpoint: LLMEndpoint, unix: float) -> None:
        meta = endpoint.metadata
        try:
            await self.kube.merge_patch(
                API_VERSION,
                KIND,
                meta.namespace,
                meta.name,
                {"status": {"lastRequestTime": _rfc3339(unix)}},
                subresource="status",
                field_manager=AUTOSCALER_FIELD_MANAGER,
            )
        except NotFoundError:
            return


async def run_autoscaler(
    kube: Kube,
    source: MetricsSource,
    settings: AutoscalerSettings = AutoscalerSettings(),
    *,
    leading: asyncio.Event | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Tick every `settings.interval` seconds while `leading` is set (always, when None), until cancelled."""
    scaler = Autoscaler(kube, source, settings, clock())
    timeout = aiohttp.ClientTimeout(total=settings.scrape_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            if leading is not None and not leading.is_set():
                scaler.history.clear()  # another replica decided meanwhile: start afresh
                await leading.wait()
                scaler.started = clock()
            try:
                await scaler.tick(session, clock())
            except OperatorError as error:
                log.warning("autoscaler tick failed: %s", error)
            await asyncio.sleep(settings.interval)
