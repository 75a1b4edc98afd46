"""The gateway's ASGI app: resolve the endpoint, check access, hold while it wakes, proxy bytes untouched.

Stateless apart from what the watcher feeds in (`Gateway.set_table`), so any number of replicas can run.
Errors use TGI's shape, `{"error": "...", "error_type": "..."}`; once a held SSE response has started, a
refusal arrives as an SSE error event on the 200 stream, as TGI reports stream errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from llm_operator.gateway import auth
from llm_operator.gateway.coldstart import ColdStart
from llm_operator.gateway.errors import GatewayError, ProxyError, error_body
from llm_operator.gateway.hold import (
    TIMEOUT_HEADER,
    HoldLimits,
    Holds,
    hold_timeout,
)
from llm_operator.gateway.metrics import GatewayMetrics
from llm_operator.gateway.routing import Key, Route, RoutingTable, Target, pick, resolve, wants_stream

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
RESPONSE_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"trailer", b"transfer-encoding", b"upgrade", b"te"}
)
KEEPALIVE = b": waiting for a replica\n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway's flags decide."""

    path_prefix: str = "/endpoints"
    hold: HoldLimits = field(default_factory=HoldLimits)
    access: auth.AccessPolicy = field(default_factory=auth.AccessPolicy.from_cidrs)
    keepalive_seconds: float = 5.0
    """Interval of SSE keep-alive comments while a stream request is held."""
    max_body_bytes: int = 4_000_000
    connect_timeout: float = 5.0
    connect_tries: int = 3
    """Ready replicas tried, one after another, when connecting fails."""


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    headers: dict[str, str] | None = None,
    content_type: bytes = b"application/json",
) -> None:
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """The ASGI callable. `wake(key)` asks for a replica of an endpoint (see `watch.ScaleWaker`); `pods`
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
            self._session = aiohttp.ClientSession(
                # Idle upstream connections are kept for 4 s, under uvicorn's 5 s keep-alive on the
                # replicas, so a request is not sent on a connection the replica is closing.
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=4.0),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.settings.connect_timeout),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
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
        target = resolve(self.table, headers.get("host"), scope["path"], self.settings.path_prefix)
        if target is None:
            await self._own_route(scope, send)
            return
        route = self.table.get(target.key)
        assert route is not None
        try:
            client = scope.get("client")
            auth.check(route, self.settings.access, client[0] if client else None, headers)
        except auth.AccessDenied as denied:
            await _respond(send, denied.status, error_body(str(denied), denied.error_type), denied.headers())
            return
        await self._serve(scope, receive, send, target, headers)

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
        path = scope["path"]
        if path == "/metrics":
            await _respond(
                send, 200, generate_latest(self.metrics.registry), content_type=CONTENT_TYPE_LATEST.encode()
            )
        elif path == "/healthz":
            await _respond(send, 200, b"ok", content_type=b"text/plain")
        elif path == "/readyz":
            await _respond(
                send,
                200 if self.ready else 503,
                b"ok" if self.ready else b"no routing table yet",
                content_type=b"text/plain",
            )
        else:
            message = f"no endpoint for {path!r}: use {self.settings.path_prefix}/<namespace>/<name>/..."
            await _respond(send, 404, error_body(message, "not_found"))

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, target: Target, headers: Headers
    ) -> None:
        """Read the body, count the request, and run it while watching for the client going away."""
        key = target.key
        try:
            body = await self._read_body(receive)
        except ProxyError as error:
            await _respond(send, error.status, error_body(str(error), error.error_type))
            return
        self.metrics.started(key, time.time())
        state = _Exchange(send)
        handler = asyncio.create_task(self._exchange(scope, state, target, headers, body))
        gone = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait({handler, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (handler, gone):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
            self.metrics.finished(key, state.status if handler.done() and not handler.cancelled() else 499)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ProxyError(499, "client_closed", "client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                raise ProxyError(
                    413, "payload_too_large", f"request body over {self.settings.max_body_bytes} bytes"
                )
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _exchange(
        self, scope: Scope, state: _Exchange, target: Target, headers: Headers, body: bytes
    ) -> None:
        key = target.key
        try:
            route = await self._ready_route(state, key, headers, target.path, body)
            await self._proxy(scope, state, route, target, headers, body)
        except GatewayError as error:
            await state.fail(error.status, str(error), error.error_type, error.headers())

    async def _ready_route(
        self, state: _Exchange, key: Key, headers: Headers, path: str, body: bytes
    ) -> Route:
        """The endpoint's route once it has a ready replica, holding the request meanwhile."""
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
                waiter = asyncio.ensure_future(self.holds.wait(key, timeout - (time.monotonic() - arrived)))
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
        out = {k: v for k, v in headers.items() if k not in HOP_BY_HOP and k != TIMEOUT_HEADER}
        if route.access == "protected":
            out.pop("authorization", None)
        client = scope.get("client")
        if client:
            prior = headers.get("x-forwarded-for")
            out["x-forwarded-for"] = f"{prior}, {client[0]}" if prior else client[0]
        out.setdefault("x-forwarded-host", headers.get("host", ""))
        out.setdefault("x-forwarded-proto", scope.get("scheme", "http"))
        return out

    async def _proxy(
        self, scope: Scope, state: _Exchange, route: Route, target: Target, headers: Headers, body: bytes
    ) -> None:
        query = scope.get("query_string", b"").decode("latin-1")
        upstream_headers = self._upstream_headers(scope, route, headers)
        tried: list[str] = []
        while True:
            candidates = tuple(a for a in route.addresses if a not in tried) or route.addresses
            address = pick(candidates, self._in_flight, next(self._turn))
            tried.append(address)
            url = f"http://{address}{target.path}" + (f"?{query}" if query else "")
            self._in_flight[address] = self._in_flight.get(address, 0) + 1
            try:
                async with self.session().request(
                    scope["method"], url, data=body or None, headers=upstream_headers, allow_redirects=False
                ) as upstream:
                    if state.cold_start is not None:
                        self._first_byte(target.key, state.cold_start, route.pods.get(address, ""))
                    await state.relay(upstream)
                    return
            except aiohttp.ClientConnectorError as error:
                current = self.table.get(target.key)
                route = current if current is not None and current.addresses else route
                if state.started or len(tried) >= self.settings.connect_tries:
                    raise ProxyError(502, "upstream_unavailable", f"no replica answered: {error}") from None
            except aiohttp.ClientError as error:
                # Connected, but the replica went away before its answer began. The request may have
                # reached it (a generation may have run), so it is not sent again.
                log.warning("replica failed before answering: %s", error, extra={"upstream": address})
                raise ProxyError(
                    502, "upstream_failed", f"the replica failed before answering: {error}"
                ) from None
            finally:
                self._in_flight[address] -= 1
                if not self._in_flight[address]:
                    del self._in_flight[address]


class _Exchange:
    """One client response: started plainly, or early as SSE while held."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.sse = False
        self.status = 200
        self.cold_start: ColdStart | None = None
        """Set when this request was held through a wake."""

    async def start_sse(self) -> None:
        await self.send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        self.started = self.sse = True
        await self.keepalive()

    async def keepalive(self) -> None:
        if self.sse:
            await self._body(KEEPALIVE, more=True)

    async def _body(self, chunk: bytes, more: bool) -> None:
        message: Message = {"type": "http.response.body", "body": chunk, "more_body": more}
        await self.send(message)

    async def fail(self, status: int, message: str, error_type: str, headers: dict[str, str]) -> None:
        """Answer an error: a response of its own, or the error event that ends a held SSE stream (counted
        with the status it would have had)."""
        self.status = status
        if self.sse:
            await self._body(b"data: " + error_body(message, error_type) + b"\n\n", more=False)
            return
        await _respond(self.send, status, error_body(message, error_type), headers)

    async def relay(self, upstream: aiohttp.ClientResponse) -> None:
        """Pass the upstream answer on, chunk by chunk as it arrives."""
        if not self.started:
            self.status = upstream.status
            raw = [(k.lower(), v) for k, v in upstream.raw_headers if k.lower() not in RESPONSE_HOP_BY_HOP]
            await self.send({"type": "http.response.start", "status": upstream.status, "headers": raw})
            self.started = True
        elif upstream.status != 200:
            try:
                payload = await upstream.read()
            except aiohttp.ClientError as error:
                await self._broke_off(upstream, error)
                return
            await self._body(b"data: " + _as_error_event(payload, upstream.status) + b"\n\n", more=False)
            return
        try:
            async for chunk in upstream.content.iter_any():
                await self._body(chunk, more=True)
        except aiohttp.ClientError as error:
            await self._broke_off(upstream, error)
            return
        await self._body(b"", more=False)

    async def _broke_off(self, upstream: aiohttp.ClientResponse, error: aiohttp.ClientError) -> None:
        """The replica went away mid-answer: end the response as well as its kind allows, counted as 502.

        An SSE stream ends with a TGI error event (`incomplete_generation`, as TGI reports a stream cut
        short); a chunked body just ends. A body with a Content-Length cannot end early: returning without
        completing it makes the server close the connection, so the client sees it cut short.
        """
        self.status = 502
        log.warning(
            "replica broke off its answer: %s",
            error,
            extra={"upstream": str(upstream.url.origin()), "path": upstream.url.path},
        )
        if self.sse or upstream.content_type == "text/event-stream":
            message = f"the replica's stream broke off: {error or type(error).__name__}"
            event = b"data: " + error_body(message, "incomplete_generation") + b"\n\n"
            await self._body(event, more=False)
        elif upstream.content_length is None:
            await self._body(b"", more=False)


def _as_error_event(payload: bytes, status: int) -> bytes:
    try:
        decoded: Any = json.loads(payload)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and "error" in decoded:
        return json.dumps(decoded).encode()
    return error_body(payload.decode(errors="replace")[:1000] or f"HTTP {status}", "upstream")


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        continue
