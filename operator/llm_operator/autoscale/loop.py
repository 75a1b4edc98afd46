"""The autoscaler's loop: every few seconds read request metrics, decide, and write Deployment replicas.

Metrics come from a source (`sources.py`: the gateways' `/metrics`, or Prometheus); the decisions are pure
(`decide.py` the replica count, `rules.py` idleness and status cadence). Writes: only the Deployment's
`spec.replicas` (a merge patch of the Deployment itself, not of its `scale` subresource, whose Scale object
carries no labels for the chart's ValidatingAdmissionPolicy to check; as the autoscaler's field manager,
guarded by the Deployment's resourceVersion) and the endpoint's `status.lastRequestTime`.
Runs in the operator while its replica leads (`run_autoscaler(..., leading=controller.leading)`). A tick
whose read fails (a gateway or Prometheus not answering, a gateway target down) changes no replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
from prometheus_client import Counter

from llm_operator.api.v1alpha1 import API_VERSION, KIND, LLMEndpoint, parse_endpoint
from llm_operator.autoscale.decide import Decision, Policy, Sample, Tuning, Window, desired_replicas
from llm_operator.autoscale.readings import Reading
from llm_operator.autoscale.rules import idle_since, last_request_due, latest
from llm_operator.autoscale.sources import READ_ERRORS, MetricsSource
from llm_operator.contract import AUTOSCALER_FIELD_MANAGER, MANAGED_BY
from llm_operator.errors import InvalidEndpointError, OperatorError
from llm_operator.kube import ConflictError, Kube, NotFoundError
from llm_operator.objects import Key, Manifest, rfc3339

log = logging.getLogger("llm_operator.autoscale")
SCALINGS = Counter("llm_operator_autoscaler_scalings", "Replica changes written", ["direction"])
READ_FAILURES = Counter(
    "llm_operator_autoscaler_metrics_read_failures", "Ticks whose request metrics could not be read"
)


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
        except READ_ERRORS as error:
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
                endpoint = parse_endpoint(body)
            except InvalidEndpointError:
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
        current = int(deployment.get("spec", {}).get("replicas", 1))
        samples = tuple(self.history.get(key, ())) if fresh else ()
        since = idle_since(deployment, current, now, self.started)
        window = Window(samples, latest(reading.last_request, status_last), since)
        decision = desired_replicas(
            window, Policy.from_spec(endpoint.spec), current, now, self.settings.tuning
        )
        ref = {"namespace": meta.namespace, "endpoint": meta.name}
        log.debug("%d replica(s) wanted: %s", decision.replicas, decision.reason, extra=ref)
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
        if reading.last_request is not None and last_request_due(
            reading.last_request, status_last, self.settings.status_every
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
                {"status": {"lastRequestTime": rfc3339(datetime.fromtimestamp(unix, UTC))}},
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
            except Exception:  # a bug: say where, and keep scaling the next tick
                log.exception("autoscaler tick failed unexpectedly")
            await asyncio.sleep(settings.interval)
