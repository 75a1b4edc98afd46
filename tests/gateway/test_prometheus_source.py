"""The autoscaler's Prometheus source against a real Prometheus server (Debian's `prometheus`, started here)
scraping real gateways (the gateway app under uvicorn on loopback) every second.

- With requests held open (streams paused by a stand-in upstream, and a request held for an endpoint at
  zero), Prometheus gives the same in-flight sums and last-request times as reading the gateways directly,
  across two gateway replicas, with `honor_labels` off (the target's own `namespace`/`endpoint` labels, as the
  Prometheus Operator sets them, clash with the gateway's) and on.
- The autoscaler loop reading Prometheus scales a Deployment of the real control plane up under load and to
  zero once idle, writing only its replicas.
- Prometheus unreachable, answering an error, or unable to scrape a gateway: every replica is kept and the
  failure is logged by name; the same idle endpoint goes to zero once the reading works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx
import pytest
import yaml
from prometheus_client import REGISTRY

from llm_devstack.controlplane import Cluster, tail
from llm_devstack.ports import free_port
from llm_devstack.processes import die_with_parent
from llm_devstack.resources import install_crd, new_namespace
from llm_devstack.upstream import StandInUpstream
from llm_devstack.waits import wait_for
from llm_operator.autoscale.decide import Tuning
from llm_operator.autoscale.loop import Autoscaler, AutoscalerSettings, run_autoscaler
from llm_operator.autoscale.readings import Reading
from llm_operator.autoscale.sources import GatewaySource, PrometheusSource, static_urls
from llm_operator.contract import AUTOSCALER_FIELD_MANAGER
from llm_operator.gateway.admin import AdminApp
from llm_operator.gateway.app import Gateway, GatewaySettings
from llm_operator.gateway.hold import HoldLimits
from llm_operator.gateway.routing import Route, RoutingTable
from llm_operator.kube import Credentials, Kube
from llm_operator.objects import Key
from tests.cluster.operator_support import get
from tests.gateway.support import serve
from tests.gateway.test_cluster_autoscale import NAME, _objects

T = TypeVar("T")
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
JOB = "llm-gateway"
SELECTOR = f'job="{JOB}"'
OPERATOR_TARGET_LABELS = {"namespace": "llm-system", "endpoint": "http"}
"""Labels the Prometheus Operator gives a ServiceMonitor target: the Service's namespace and the port name."""
BUSY = ("ml", "falcon")
ASLEEP = ("ml", "asleep")
TIMEOUT = httpx.Timeout(30.0)


@dataclass
class Prometheus:
    """One prometheus process scraping static targets every second."""

    workdir: Path
    jobs: dict[str, Sequence[str]]
    honor_labels: bool = False
    port: int = field(default_factory=free_port)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "prometheus.log"

    def start(self) -> Prometheus:
        if not Path(PROMETHEUS).exists():
            raise RuntimeError(
                f"{PROMETHEUS} is missing: `make system-packages` installs Debian's prometheus"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": job,
                    "honor_labels": self.honor_labels,
                    "static_configs": [{"targets": list(targets), "labels": OPERATOR_TARGET_LABELS}],
                }
                for job, targets in self.jobs.items()
            ],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        with self.log.open("wb") as log:
            self.popen = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                problem = "exited" if self.popen.poll() is not None else "not ready within 60s"
                self.stop()
                raise RuntimeError(f"prometheus {problem}; its log:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)

    def log_tail(self) -> str:
        return tail(self.log)

    async def query(self, session: aiohttp.ClientSession, promql: str) -> list[dict[str, Any]]:
        async with session.get(f"{self.url}/api/v1/query", params={"query": promql}) as answer:
            body: dict[str, Any] = await answer.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


class _AttachLogs:
    """Adds each Prometheus log's tail to the report of the test that started it, when the test fails."""

    def __init__(self, item: pytest.Item) -> None:
        self.item = item
        self.servers: list[Prometheus] = []

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if item is self.item and report.failed:
            for server in self.servers:
                report.sections.append((f"prometheus on :{server.port} log (tail)", server.log_tail()))
        return report


StartPrometheus = Callable[..., Prometheus]


@pytest.fixture
def prometheus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StartPrometheus]:
    """Starts prometheus processes: `prometheus({job: [host:port, ...]}, honor_labels=...)`; all are
    stopped at teardown, and a failing test's report carries their logs."""
    attach = _AttachLogs(request.node)
    request.config.pluginmanager.register(attach)

    def start(jobs: dict[str, Sequence[str]], honor_labels: bool = False) -> Prometheus:
        server = Prometheus(tmp_path / f"prometheus-{len(attach.servers)}", jobs, honor_labels)
        attach.servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in attach.servers:
            server.stop()
        request.config.pluginmanager.unregister(attach)


async def _no_wake(key: Key) -> None:
    """Scale-ups are the autoscaler's business here: the gateway's wake does nothing."""


@dataclass
class Gateways:
    """Gateway replicas before one gated stand-in upstream, with clients."""

    upstream: StandInUpstream
    gate: asyncio.Event
    """Opened, the paused streams finish."""
    urls: list[str]
    admin_urls: list[str]
    """Where each gateway serves its metrics (`gateway.admin`)."""
    clients: list[httpx.AsyncClient]
    streams: contextlib.AsyncExitStack
    readers: list[AsyncIterator[bytes]] = field(default_factory=list)
    held: list[asyncio.Task[httpx.Response]] = field(default_factory=list)

    def hold(self, replica: int, key: Key) -> asyncio.Task[httpx.Response]:
        """A request through gateway `replica` for an endpoint without replicas: held until cancelled."""
        path = f"/endpoints/{key[0]}/{key[1]}/generate"
        self.held.append(asyncio.create_task(self.clients[replica].post(path, json={"inputs": "hi"})))
        return self.held[-1]

    @property
    def targets(self) -> list[str]:
        return [url.removeprefix("http://") for url in self.admin_urls]

    def direct(self) -> GatewaySource:
        return GatewaySource(static_urls([f"{url}/metrics" for url in self.admin_urls]))

    async def open_stream(self, replica: int, key: Key) -> None:
        """A stream through gateway `replica` that stays open (in flight) until the upstream's gate opens."""
        answer = await self.streams.enter_async_context(
            self.clients[replica].stream(
                "POST", f"/endpoints/{key[0]}/{key[1]}/generate_stream", json={"inputs": "hi"}
            )
        )
        assert answer.status_code == 200
        chunks = answer.aiter_raw()
        self.readers.append(chunks)  # a dropped reader would close the stream
        first = await asyncio.wait_for(anext(chunks), 10)
        assert first.startswith(b"data: ")


@contextlib.asynccontextmanager
async def gateways(
    replicas: int, ready: Sequence[Key], asleep: Sequence[Key] = ()
) -> AsyncIterator[Gateways]:
    """`replicas` gateways routing `ready` endpoints to the upstream; `asleep` ones have no replica."""
    upstream, gate = StandInUpstream(), asyncio.Event()
    upstream.gate = gate
    settings = GatewaySettings(hold=HoldLimits(max_waiting=8, timeout=120.0))
    async with contextlib.AsyncExitStack() as stack:
        address = (await stack.enter_async_context(serve(upstream.app))).removeprefix("http://")
        urls, admin_urls, clients = [], [], []
        for _ in range(replicas):
            gateway = Gateway(settings, _no_wake)
            routes = [Route(*k, addresses=(address,)) for k in ready] + [Route(*k) for k in asleep]
            gateway.set_table(RoutingTable({r.key: r for r in routes}))
            urls.append(await stack.enter_async_context(serve(gateway)))
            admin = AdminApp(gateway.metrics.registry, lambda: True)
            admin_urls.append(await stack.enter_async_context(serve(admin)))
            clients.append(
                await stack.enter_async_context(httpx.AsyncClient(base_url=urls[-1], timeout=TIMEOUT))
            )
        streams = await stack.enter_async_context(contextlib.AsyncExitStack())
        rig = Gateways(upstream, gate, urls, admin_urls, clients, streams)
        try:
            yield rig
        finally:
            gate.set()  # let the paused streams end before the servers stop
            for task in rig.held:
                task.cancel()
            await asyncio.gather(*rig.held, return_exceptions=True)


async def eventually(
    read: Callable[[], Awaitable[T]], expected: Callable[[T], bool], what: str, seconds: float = 30.0
) -> T:
    """Read until `expected` holds (Prometheus scrapes every second), at most `seconds`; the last reading."""
    deadline = time.monotonic() + seconds
    while True:
        reading = await read()
        if expected(reading):
            return reading
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what}; last reading {reading}")
        await asyncio.sleep(0.2)


async def settled(
    session: aiohttp.ClientSession,
    source: PrometheusSource,
    expected: Callable[[dict[Key, Reading]], bool],
    what: str,
) -> dict[Key, Reading]:
    """Read through Prometheus until `expected` holds (a refused reading, as before the first scrape, is
    read again)."""

    async def read() -> dict[Key, Reading] | ValueError:
        try:
            return await source.read(session)
        except ValueError as error:
            return error

    reading = await eventually(
        read, lambda r: not isinstance(r, ValueError) and expected(r), f"through prometheus: {what}"
    )
    assert not isinstance(reading, ValueError)
    return reading


@pytest.mark.parametrize("honor_labels", [False, True], ids=["honor_labels-off", "honor_labels-on"])
async def test_prometheus_reads_what_the_gateways_report(
    prometheus: StartPrometheus, honor_labels: bool
) -> None:
    async with gateways(2, [BUSY], [ASLEEP]) as rig, aiohttp.ClientSession() as session:
        server = await asyncio.to_thread(prometheus, {JOB: rig.targets}, honor_labels)
        source = PrometheusSource(server.url, SELECTOR)
        for replica in (0, 0, 0, 1, 1):  # 3 streams through one gateway, 2 through the other
            await rig.open_stream(replica, BUSY)
        held = rig.hold(1, ASLEEP)
        direct = rig.direct()
        expected = {BUSY: 5.0, ASLEEP: 1.0}
        in_flight = await eventually(
            lambda: direct.read(session), lambda r: {k: v.in_flight for k, v in r.items()} == expected, "held"
        )
        from_gateways = await direct.read(session)
        assert from_gateways == in_flight

        from_prometheus = await settled(
            session,
            source,
            lambda r: {k: v.in_flight for k, v in r.items()} == expected,
            "5 streams and 1 held request",
        )
        assert from_prometheus.keys() == from_gateways.keys() == {BUSY, ASLEEP}
        for key in expected:
            assert from_prometheus[key].in_flight == from_gateways[key].in_flight == expected[key]
            assert from_prometheus[key].last_request == pytest.approx(
                from_gateways[key].last_request, abs=1e-3
            )
        # the latest request time over the replicas: BUSY's last stream went through the second gateway
        per_gateway = [
            await GatewaySource(static_urls([f"{u}/metrics"])).read(session) for u in rig.admin_urls
        ]
        first, second = per_gateway[0][BUSY].last_request, per_gateway[1][BUSY].last_request
        assert first is not None
        assert second is not None
        assert first < second
        assert from_prometheus[BUSY].last_request == pytest.approx(second, abs=1e-3)

        # everything finishes: zero in flight, the last request times stay
        rig.gate.set()
        await rig.streams.aclose()
        held.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held
        idle = await settled(
            session, source, lambda r: all(v.in_flight == 0 for v in r.values()) and len(r) == 2, "idle"
        )
        assert idle == {k: Reading(0.0, from_prometheus[k].last_request) for k in expected}
        assert {k: r.last_request for k, r in (await direct.read(session)).items()} == {
            k: r.last_request for k, r in idle.items()
        }


def _deployment(cluster: Cluster, namespace: str) -> dict[str, Any]:
    return get(cluster, "deployment", NAME, "-n", namespace)


async def _ready_replicas(cluster: Cluster, namespace: str, replicas: int) -> None:
    def ready() -> bool | None:
        body = _deployment(cluster, namespace)
        status = body.get("status") or {}
        return (body["spec"]["replicas"] == replicas and status.get("readyReplicas", 0) == replicas) or None

    await asyncio.to_thread(wait_for, ready, 90, f"{replicas} ready replicas")


@pytest.mark.cluster
async def test_autoscaler_loop_on_prometheus_scales_up_under_load_and_to_zero_when_idle(
    cluster: Cluster, prometheus: StartPrometheus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llm_operator.autoscale")
    install_crd(cluster)
    namespace = await asyncio.to_thread(new_namespace, cluster, "prom")
    key = (namespace, NAME)
    objects = _objects(namespace)
    objects[1]["spec"]["replicas"] = 0  # scaled to zero; maxReplicas 3, targetConcurrency 4
    await asyncio.to_thread(cluster.kubectl, "apply", "-f", "-", input=yaml.safe_dump_all(objects))
    before = await asyncio.to_thread(get, cluster, "llmendpoint", NAME, "-n", namespace)
    deployed = await asyncio.to_thread(_deployment, cluster, namespace)
    settings = AutoscalerSettings(
        interval=0.5,
        tuning=Tuning(window=3, scale_down_stabilization=0, stale_after=10),
        namespaces=(namespace,),
    )
    credentials = Credentials.load(str(cluster.kubeconfig))
    async with (
        gateways(2, [key]) as rig,
        aiohttp.ClientSession() as session,
        Kube(credentials) as kube,
    ):
        server = await asyncio.to_thread(prometheus, {JOB: rig.targets})
        source = PrometheusSource(server.url, SELECTOR)
        for replica in [0, 1] * 5:  # 10 in flight: ceil(10 / 4) = 3 replicas
            await rig.open_stream(replica, key)
        loaded = await settled(session, source, lambda r: r.get(key, Reading()).in_flight == 10, "the load")
        scaler = asyncio.create_task(run_autoscaler(kube, source, settings))
        try:
            await _ready_replicas(cluster, namespace, 3)
            # the autoscaler's field manager owns the replicas, written on the Deployment itself (not its
            # scale subresource, which the chart's admission policy cannot check), and nothing else
            scaled = await asyncio.to_thread(
                get, cluster, "deployment", NAME, "-n", namespace, "--show-managed-fields"
            )
            fields = scaled["metadata"]["managedFields"]
            owned = [
                (m.get("subresource"), m["fieldsV1"])
                for m in fields
                if m["manager"] == AUTOSCALER_FIELD_MANAGER
            ]
            assert owned == [(None, {"f:spec": {"f:replicas": {}}})], json.dumps(fields)
            rig.gate.set()
            await rig.streams.aclose()
            try:
                await _ready_replicas(cluster, namespace, 0)
            except AssertionError as error:  # say what the autoscaler saw (this step has been flaky)
                said = [r.getMessage() for r in caplog.records if r.name.startswith("llm_operator")][-8:]
                now = await source.read(session)
                raise AssertionError(f"{error}; reading now {now}; log {said}") from None
        finally:
            scaler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scaler

    # only the replicas changed; the endpoint's spec is untouched, its status has the last request time
    after = await asyncio.to_thread(_deployment, cluster, namespace)
    assert {**after["spec"], "replicas": 0} == {**deployed["spec"], "replicas": 0}
    stored = await asyncio.to_thread(get, cluster, "llmendpoint", NAME, "-n", namespace)
    assert stored["spec"] == before["spec"]
    assert stored["metadata"]["generation"] == before["metadata"]["generation"]
    last = loaded[key].last_request
    assert last is not None
    assert stored["status"]["lastRequestTime"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last))
    await asyncio.to_thread(cluster.kubectl, "delete", "namespace", namespace, "--wait=false")


@pytest.mark.cluster
async def test_missing_metrics_keep_the_replicas(
    cluster: Cluster, prometheus: StartPrometheus, caplog: pytest.LogCaptureFixture
) -> None:
    install_crd(cluster)
    namespace = await asyncio.to_thread(new_namespace, cluster, "prom")
    key = (namespace, NAME)
    await asyncio.to_thread(
        cluster.kubectl, "apply", "-f", "-", input=yaml.safe_dump_all(_objects(namespace))
    )
    await _ready_replicas(cluster, namespace, 1)  # idle, scaleToZeroAfter 1s: only missing data keeps it
    tuning = Tuning(window=3, scale_down_stabilization=0, stale_after=10)
    settings = AutoscalerSettings(tuning=tuning, namespaces=(namespace,))
    credentials = Credentials.load(str(cluster.kubeconfig))
    caplog.set_level(logging.WARNING, logger="llm_operator.autoscale")
    dead = f"127.0.0.1:{free_port()}"
    async with (
        gateways(1, [key]) as rig,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        Kube(credentials) as kube,
    ):
        server = await asyncio.to_thread(prometheus, {JOB: rig.targets, "gone-gateway": [dead]})

        async def ups() -> dict[str, str]:
            return {r["metric"]["job"]: r["value"][1] for r in await server.query(session, "up")}

        await eventually(ups, lambda found: found == {JOB: "1", "gone-gateway": "0"}, "both jobs scraped")

        async def tick(source: PrometheusSource, scaler: Autoscaler | None = None, at: float = 20) -> int:
            """One tick `at` seconds from now (by default of an autoscaler that has seen no sample yet)."""
            scaler = scaler or Autoscaler(kube, source, settings, started=time.time() - 3600)
            scaler.source = source
            replicas = (await scaler.tick(session, time.time() + at))[key].replicas
            assert (await asyncio.to_thread(_deployment, cluster, namespace))["spec"]["replicas"] == replicas
            return replicas

        def read_failures() -> float:
            return REGISTRY.get_sample_value("llm_operator_autoscaler_metrics_read_failures_total") or 0.0

        unreachable = f"http://127.0.0.1:{free_port()}"
        cases = [
            (
                PrometheusSource(unreachable),
                f"ClientConnectorError: Cannot connect to host {unreachable[7:]}",
            ),
            (PrometheusSource(server.url, "job="), "answered HTTP 400 to 'up{job=}': bad_data: "),
            (
                PrometheusSource(server.url, 'job="gone-gateway"'),
                f"cannot scrape gateway(s) {dead} (up == 0)",
            ),
            (
                PrometheusSource(server.url, 'job="no-such-job"'),
                'scrapes no gateway (no series up{job="no-such',
            ),
        ]
        for source, message in cases:
            caplog.clear()
            failures = read_failures()
            assert await tick(source) == 1, message
            assert read_failures() == failures + 1
            (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert "every endpoint keeps its replicas this tick" in record.getMessage()
            assert message in record.getMessage()

        # an autoscaler that has read "idle" (too early for zero: it has just started) does not act on that
        # older sample when the next read fails; the next good read takes the idle endpoint to zero
        working = PrometheusSource(server.url, SELECTOR)
        scaler = Autoscaler(kube, working, settings, started=time.time())
        assert await tick(working, scaler, at=0) == 1
        assert await tick(cases[0][0], scaler, at=5) == 1
        scaler.source = working
        decision = (await scaler.tick(session, time.time() + 6))[key]
        state = (await asyncio.to_thread(_deployment, cluster, namespace)).get("status")
        assert decision.replicas == 0, f"{decision.reason}; Deployment status {state}"
    await asyncio.to_thread(cluster.kubectl, "delete", "namespace", namespace, "--wait=false")
