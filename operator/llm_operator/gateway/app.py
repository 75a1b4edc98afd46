"""The gateway's ASGI app: resolve the endpoint, check access, hold while it wakes, proxy bytes untouched.

Stateless apart from what the watcher feeds in (`Gateway.set_table`), so any number of replicas can run.
The decisions are in pure modules (`routing`, `auth`, `headers`, `hold`, `proxy`, `coldstart`); this one
does the I/O. Errors use TGI's shape, `{"error": "...", "error_type": "..."}`; once a held SSE response has
started, a refusal arrives as an SSE error event on the 200 stream, as TGI reports stream errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from llm_operator.gateway import auth, headers, proxy
from llm_operator.gateway.coldstart import ColdStart, ColdStarts
from llm_operator.gateway.errors import EndpointPaused, GatewayError, NoEndpoint
from llm_operator.gateway.exchange import Exchange, disconnected, refuse
from llm_operator.gateway.hold import HoldLimits, Holds, client_key, hold_timeout
from llm_operator.gateway.limits import BodyBudget, ServerLimits, read_body
from llm_operator.gateway.metrics import GatewayMetrics
from llm_operator.gateway.routing import Route, RoutingTable, Target, resolve, wants_stream
from llm_operator.gateway.upstream import Attempt, UpstreamSettings, broken, client_session
from llm_operator.objects import Key

log = logging.getLogger("llm_operator.gateway")
ReadPod = Callable[[str, str], Awaitable[Mapping[str, Any] | None]]
"""Reads a pod by (namespace, name); None when it cannot be read."""
RETRYING: Mapping[proxy.Failure, str] = {
    "unavailable": "replica answered 503, trying another",
    "stale_key": "replica refused the key, trying another",
}


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway's flags decide."""

    hold: HoldLimits = field(default_factory=HoldLimits)
    access: auth.AccessPolicy = field(default_factory=auth.AccessPolicy.from_cidrs)
    keepalive_seconds: float = 5.0
    """Interval of SSE keep-alive comments while a stream request is held."""
    limits: ServerLimits = field(default_factory=ServerLimits)
    """Bounds on headers, bodies, read times and connections (see `limits`)."""
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)


class Gateway:
    """The ASGI callable. `wake(key)` asks for a replica of an endpoint (see `watch.StatusWaker`); `pods`
    reads the woken pod for the cold-start breakdown (without it, only the gateway's own phases are kept)."""

    def __init__(
        self,
        settings: GatewaySettings,
        wake: Callable[[Key], Awaitable[None]],
        metrics: GatewayMetrics | None = None,
        pods: ReadPod | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or GatewayMetrics()
        self.table = RoutingTable()
        self.holds = Holds(settings.hold, self._timed_wake)
        self.bodies = BodyBudget(settings.limits.body_budget_bytes)
        """Bytes of the request bodies buffered now, held ones included."""
        self.replicas = proxy.Replicas()
        self._wake, self._pods = wake, pods
        self._cold_starts = ColdStarts()
        self._reports: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.ready = False
        """True once the watcher has built the first table (the readiness probe says so)."""

    def set_table(self, table: RoutingTable) -> None:
        """Install a new routing table; release or re-arm the holds of endpoints whose readiness changed."""
        for key in self.table.routes.keys() - table.routes.keys():
            self.holds.forget(key)
            self.metrics.forget(key)
        for key, route in table.routes.items():
            self.holds.set_ready(key, bool(route.addresses))
        self.table = table

    async def _timed_wake(self, key: Key) -> None:
        await self._wake(key)
        self._cold_starts.mark(key, "trigger", time.monotonic())
        log.info("wake sent", extra={"namespace": key[0], "endpoint": key[1]})

    def _first_byte(self, key: Key, cold: ColdStart, pod: str) -> None:
        """Report the breakdown of a wake at its first answer byte (once, whichever held request is first)."""
        if not self._cold_starts.first_byte(key, cold, time.monotonic()):
            return
        task = asyncio.create_task(self._report_cold_start(key, cold, pod), name=f"cold-start-{key[1]}")
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report_cold_start(self, key: Key, cold: ColdStart, pod: str) -> None:
        """Add the pod's own timestamps, then record every phase as metrics and one log line."""
        if pod and self._pods is not None and (body := await self._pods(key[0], pod)) is not None:
            cold.add_pod(body)
        for phase, seconds in cold.marks.items():
            self.metrics.cold_start_phase(key, phase, seconds)
        log.info(
            "cold start of %s/%s: %s",
            *key,
            cold.summary(),
            extra={"namespace": key[0], "endpoint": key[1], "pod": pod, "cold_start_seconds": cold.marks},
        )

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = client_session(self.settings.upstream)
        return self._session

    async def close(self) -> None:
        await self.holds.close()
        for task in list(self._reports):
            task.cancel()
        await asyncio.gather(*self._reports, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Headers(scope=scope)
        client = scope.get("client")
        peer = client[0] if client else None
        try:
            target = self._target(scope, request)
            route = self.table.get(target.key)
            assert route is not None
            auth.check(route, self.settings.access, peer, request)
        except GatewayError as error:
            await refuse(send, error)
            return
        hops = headers.forwarded_for(request) if self.settings.access.trust_forwarded else None
        token = auth.bearer(request) if route.access == "protected" else None
        await self._serve(
            scope, receive, send, target, request, client_key(token, hops[-1] if hops else peer)
        )

    def _target(self, scope: Scope, request: Headers) -> Target:
        """The endpoint and path the request is for; NoEndpoint for paths of none (metrics and health are
        on the admin port, see `admin`)."""
        raw_path, _ = proxy.request_target(
            scope.get("raw_path") or scope["path"].encode(), scope.get("query_string", b"")
        )
        target = resolve(self.table, request.get("host"), scope["path"], raw_path)
        if target is None:
            raise NoEndpoint(scope["path"])
        return target

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, target: Target, request: Headers, client: str
    ) -> None:
        """Read the body, count the request, and run it while watching for the client going away. Every
        way out, an exception included, counts the request as finished."""
        key = target.key
        try:
            body = await read_body(receive, self.settings.limits, self.bodies)
        except GatewayError as error:
            await refuse(send, error)
            return
        self.metrics.started(key, time.time())
        state = Exchange(send)
        handler = asyncio.create_task(self._exchange(scope, state, target, request, body, client))
        gone = asyncio.create_task(disconnected(receive))
        status = 499
        try:
            await asyncio.wait({handler, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (handler, gone):
                task.cancel()
            try:
                with contextlib.suppress(asyncio.CancelledError):
                    await handler
                    status = state.status
            except Exception:  # a bug: counted as a 500, then raised to the server, which logs it
                status = 500
                raise
            finally:
                self.metrics.finished(key, status)
                self.bodies.give(len(body))

    async def _exchange(
        self, scope: Scope, state: Exchange, target: Target, request: Headers, body: bytes, client: str
    ) -> None:
        try:
            route = await self._ready_route(state, target, request, body, client)
            await self._proxy(scope, state, route, target, request, body)
        except GatewayError as error:
            await state.fail(error)

    async def _ready_route(
        self, state: Exchange, target: Target, request: Headers, body: bytes, client: str
    ) -> Route:
        """The endpoint's route once it has a ready replica, holding the request meanwhile (as one of
        `client`'s, see `hold.client_key`) and timing the wake (see `coldstart`)."""
        key = target.key
        route = self.table.get(key)
        if route is not None and route.paused:
            raise EndpointPaused(key)
        if route is not None and route.addresses:
            return route
        timeout = hold_timeout(request.get(headers.TIMEOUT_HEADER), self.settings.hold)
        arrived = time.monotonic()
        cold = self._cold_starts.begin(key, time.time(), arrived)
        if wants_stream(target.path, request, body):
            await state.start_sse()
        held = self.metrics.held.labels(*key)
        held.inc()
        try:
            route = await self.holds.until_ready(
                key,
                lambda: self.table.get(key),
                arrived + timeout,
                client,
                state.keepalive,
                self.settings.keepalive_seconds,
            )
        except BaseException:
            if not self.holds.waiting(key):
                self._cold_starts.abandon(key)  # the wake failed or the endpoint went away
            raise
        finally:
            held.dec()
        cold.mark("ready", time.monotonic())
        state.cold_start = cold
        return route

    async def _proxy(
        self, scope: Scope, state: Exchange, route: Route, target: Target, request: Headers, body: bytes
    ) -> None:
        """Send the request to a ready replica and relay its answer; try another (see `proxy.Tries`) while
        nothing of an answer has been relayed."""
        query = scope.get("query_string", b"").decode("ascii")  # checked by proxy.request_target
        client = scope.get("client")
        sent = headers.upstream(request, client[0] if client else None, scope.get("scheme", "http"))
        tries = proxy.Tries(self.settings.upstream.tries)
        while True:
            address = self.replicas.choose(route.addresses, tries)
            attempt = Attempt()
            with self.replicas.sending(address):
                try:
                    async with self.session().request(
                        scope["method"],
                        proxy.upstream_url(address, target.raw_path, query),
                        data=body or None,
                        headers=sent,
                        allow_redirects=False,
                        trace_request_ctx=attempt,
                    ) as upstream:
                        failure = proxy.refused_answer(upstream.status, route.access == "protected")
                        if failure is not None and tries.again(failure, route.addresses, attempt.reused):
                            log.info(RETRYING[failure], extra={"upstream": address})
                            continue
                        if state.cold_start is not None:
                            self._first_byte(target.key, state.cold_start, route.pods.get(address, ""))
                        await state.relay(upstream)
                        return
                except aiohttp.ClientError as error:
                    how = broken(error)
                    if how == "connect":
                        current = self.table.get(target.key)
                        route = current if current is not None and current.addresses else route
                    elif how != "timeout":
                        # Connected, but the replica closed or reset the connection before its answer began.
                        log.warning("replica failed before answering: %s", error, extra={"upstream": address})
                    if not tries.again(how, route.addresses, attempt.reused):
                        raise proxy.refusal(how, str(error), self.settings.upstream.read_timeout) from None
