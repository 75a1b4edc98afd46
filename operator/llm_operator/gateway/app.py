"""The gateway's ASGI app: resolve the endpoint, check access, hold while it wakes, proxy bytes untouched.

Stateless apart from what the watcher feeds in (`Gateway.set_table`), so any number of replicas can run.
Errors use TGI's shape, `{"error": "...", "error_type": "..."}`; once a held SSE response has started, a
refusal arrives as an SSE error event on the 200 stream, as TGI reports stream errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from llm_operator.gateway import auth, proxy
from llm_operator.gateway.coldstart import ColdStart
from llm_operator.gateway.errors import GatewayError, ProxyError, error_body
from llm_operator.gateway.exchange import Exchange, disconnected, respond
from llm_operator.gateway.hold import (
    TIMEOUT_HEADER,
    HoldLimits,
    Holds,
    client_key,
    hold_timeout,
)
from llm_operator.gateway.limits import BodyBudget, BodyRefused, ServerLimits
from llm_operator.gateway.metrics import GatewayMetrics
from llm_operator.gateway.routing import Key, Route, RoutingTable, Target, pick, resolve, wants_stream
from llm_operator.gateway.upstream import Attempt, UpstreamSettings, client_session

log = logging.getLogger("llm_operator.gateway")
PodReader = Callable[[str, str], Awaitable[Mapping[str, Any] | None]]
"""Reads a pod by (namespace, name); None when it cannot be read."""

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway's flags decide."""

    path_prefix: str = "/endpoints"
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
        pods: PodReader | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or GatewayMetrics()
        self.table = RoutingTable()
        self.holds = Holds(settings.hold, self._timed_wake)
        self.bodies = BodyBudget(settings.limits.body_budget_bytes)
        """Bytes of the request bodies buffered now, held ones included."""
        self._wake, self._pods = wake, pods
        self._cold_starts: dict[Key, ColdStart] = {}
        """The wake under way per endpoint, from its first held request to its first answer byte."""
        self._reports: set[asyncio.Task[None]] = set()
        self._turn = itertools.count()
        self._in_flight: dict[str, int] = {}
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
        if (cold := self._cold_starts.get(key)) is not None:
            cold.mark("trigger", time.monotonic())
        log.info("wake sent", extra={"namespace": key[0], "endpoint": key[1]})

    def _first_byte(self, key: Key, cold: ColdStart, pod: str) -> None:
        """The first answer byte after a wake closes its breakdown (once, whichever held request is first)."""
        if self._cold_starts.get(key) is not cold:
            return
        del self._cold_starts[key]
        cold.mark("first_byte", time.monotonic())
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
        headers = Headers(scope=scope)
        try:
            raw_path, _ = proxy.request_target(
                scope.get("raw_path") or scope["path"].encode(), scope.get("query_string", b"")
            )
            target = resolve(
                self.table, headers.get("host"), scope["path"], self.settings.path_prefix, raw_path
            )
        except proxy.BadRequest as bad:
            await respond(send, bad.status, error_body(str(bad), bad.error_type))
            return
        if target is None:
            await self._own_route(scope, send)
            return
        route = self.table.get(target.key)
        assert route is not None
        client = scope.get("client")
        peer = client[0] if client else None
        try:
            auth.check(route, self.settings.access, peer, headers)
        except auth.AccessDenied as denied:
            await respond(send, denied.status, error_body(str(denied), denied.error_type), denied.headers())
            return
        hops = auth.forwarded_for(headers) if self.settings.access.trust_forwarded else None
        token = auth.bearer(headers) if route.access == "protected" else None
        await self._serve(
            scope, receive, send, target, headers, client_key(token, hops[-1] if hops else peer)
        )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _own_route(self, scope: Scope, send: Send) -> None:
        """Paths of no endpoint: 404 (metrics and health are on the admin port, see `admin`)."""
        path = scope["path"]
        message = f"no endpoint for {path!r}: use {self.settings.path_prefix}/<namespace>/<name>/..."
        await respond(send, 404, error_body(message, "not_found"))

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, target: Target, headers: Headers, client: str
    ) -> None:
        """Read the body, count the request, and run it while watching for the client going away. Every
        way out, an exception included, counts the request as finished."""
        key = target.key
        try:
            body = await self._read_body(receive)
        except GatewayError as error:
            await respond(send, error.status, error_body(str(error), error.error_type), error.headers())
            return
        self.metrics.started(key, time.time())
        state = Exchange(send)
        handler = asyncio.create_task(self._exchange(scope, state, target, headers, body, client))
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
            except Exception:
                status = 500
                raise
            finally:
                self.metrics.finished(key, status)
                self.bodies.give(len(body))

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole body, within the body bounds: 413 over `max_body_bytes`, 408 past `body_seconds`, 503
        when the buffered bodies would exceed their budget (the body's bytes stay taken from the budget
        until `_serve` gives them back)."""
        bounds = self.settings.limits
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(bounds.body_seconds):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ProxyError(499, "client_closed", "client went away")
                    chunk = message.get("body", b"")
                    if size + len(chunk) > bounds.max_body_bytes:
                        text = f"request body over {bounds.max_body_bytes} bytes"
                        raise BodyRefused(413, "payload_too_large", text)
                    if not self.bodies.take(len(chunk)):
                        text = "the gateway holds as many request bodies as it may; retry later"
                        raise BodyRefused(503, "overloaded", text, retry_after=1)
                    size += len(chunk)
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            self.bodies.give(size)
            text = f"request body not received within {bounds.body_seconds:g}s"
            raise BodyRefused(408, "request_timeout", text) from None
        except BaseException:
            self.bodies.give(size)
            raise
        return b"".join(chunks)

    async def _exchange(
        self, scope: Scope, state: Exchange, target: Target, headers: Headers, body: bytes, client: str
    ) -> None:
        key = target.key
        try:
            route = await self._ready_route(state, key, headers, target.path, body, client)
            await self._proxy(scope, state, route, target, headers, body)
        except GatewayError as error:
            await state.fail(error.status, str(error), error.error_type, error.headers())

    async def _ready_route(
        self, state: Exchange, key: Key, headers: Headers, path: str, body: bytes, client: str
    ) -> Route:
        """The endpoint's route once it has a ready replica, holding the request meanwhile (as one of
        `client`'s, see `hold.client_key`)."""
        route = self.table.get(key)
        if route is not None and route.paused:
            raise ProxyError(
                503, "paused", f"endpoint {key[0]}/{key[1]} is paused (spec.paused): resume it to use it"
            )
        if route is not None and route.addresses:
            return route
        timeout = hold_timeout(headers.get(TIMEOUT_HEADER), self.settings.hold)
        arrived = time.monotonic()
        cold = self._cold_starts.setdefault(key, ColdStart(time.time(), arrived))
        if wants_stream(path, headers, body):
            await state.start_sse()
        held = self.metrics.held.labels(*key)
        held.inc()
        try:
            while route is None or not route.addresses:
                within = timeout - (time.monotonic() - arrived)
                waiter = asyncio.ensure_future(self.holds.wait(key, within, client))
                try:
                    while not (await asyncio.wait({waiter}, timeout=self.settings.keepalive_seconds))[0]:
                        await state.keepalive()
                finally:
                    waiter.cancel()
                waiter.result()
                route = self.table.get(key)
                if route is None:
                    raise ProxyError(404, "not_found", f"endpoint {key[0]}/{key[1]} was deleted")
        finally:
            held.dec()
            if (route is None or not route.addresses) and not self.holds.waiting(key):
                self._cold_starts.pop(key, None)  # the wake failed or the endpoint went away
        cold.mark("ready", time.monotonic())
        state.cold_start = cold
        return route

    def _upstream_headers(self, scope: Scope, route: Route, headers: Headers) -> dict[str, str]:
        # Authorization goes upstream as sent: a protected endpoint's pods check the same bearer token
        out = {k: v for k, v in headers.items() if k not in HOP_BY_HOP and k != TIMEOUT_HEADER}
        client = scope.get("client")
        if client:
            prior = headers.get("x-forwarded-for")
            out["x-forwarded-for"] = f"{prior}, {client[0]}" if prior else client[0]
        out.setdefault("x-forwarded-host", headers.get("host", ""))
        out.setdefault("x-forwarded-proto", scope.get("scheme", "http"))
        return out

    async def _proxy(
        self, scope: Scope, state: Exchange, route: Route, target: Target, headers: Headers, body: bytes
    ) -> None:
        """Send the request to a ready replica and relay its answer; try another (see `proxy.should_retry`)
        while nothing of an answer has been relayed."""
        query = scope.get("query_string", b"").decode("ascii")  # checked by proxy.request_target
        upstream_headers = self._upstream_headers(scope, route, headers)
        tried: list[str] = []
        while True:
            address = pick(proxy.candidates(route.addresses, tried), self._in_flight, next(self._turn))
            tried.append(address)
            attempt = Attempt()
            self._in_flight[address] = self._in_flight.get(address, 0) + 1
            try:
                async with self.session().request(
                    scope["method"],
                    proxy.upstream_url(address, target.raw_path, query),
                    data=body or None,
                    headers=upstream_headers,
                    allow_redirects=False,
                    trace_request_ctx=attempt,
                ) as upstream:
                    if upstream.status == 503 and self._retry("unavailable", route, tried, attempt):
                        log.info("replica answered 503, trying another", extra={"upstream": address})
                        continue
                    stale = upstream.status == 401 and route.access == "protected"
                    if stale and self._retry("stale_key", route, tried, attempt):
                        log.info("replica refused the key, trying another", extra={"upstream": address})
                        continue
                    if state.cold_start is not None:
                        self._first_byte(target.key, state.cold_start, route.pods.get(address, ""))
                    await state.relay(upstream)
                    return
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
                current = self.table.get(target.key)
                route = current if current is not None and current.addresses else route
                if not self._retry("connect", route, tried, attempt):
                    raise ProxyError(502, "upstream_unavailable", f"no replica answered: {error}") from None
            except aiohttp.ServerTimeoutError:
                wait = self.settings.upstream.read_timeout
                raise ProxyError(504, "upstream_timeout", f"the replica sent nothing for {wait:g}s") from None
            except aiohttp.ClientError as error:
                # Connected, but the replica closed or reset the connection before its answer began.
                log.warning("replica failed before answering: %s", error, extra={"upstream": address})
                closed = isinstance(error, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
                if not closed or not self._retry("disconnect", route, tried, attempt):
                    raise ProxyError(
                        502, "upstream_failed", f"the replica failed before answering: {error}"
                    ) from None
            finally:
                self._in_flight[address] -= 1
                if not self._in_flight[address]:
                    del self._in_flight[address]

    def _retry(self, failure: proxy.Failure, route: Route, tried: list[str], attempt: Attempt) -> bool:
        return proxy.should_retry(
            failure,
            tries=len(tried),
            max_tries=self.settings.upstream.tries,
            untried=any(a not in tried for a in route.addresses),
            reused=attempt.reused,
        )
