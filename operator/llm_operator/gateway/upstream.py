"""The gateway's HTTP client to serving replicas: its bounds, TCP keep-alive, reused connections.

Bounds: connecting takes at most `connect_timeout`; once connected, at most `read_timeout` may pass between
two bytes of the answer (the first included), so a replica on a lost node ends the request instead of
holding it (and its in-flight count) forever. TCP keep-alive probes find such a peer even while a stream is
quiet between events.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from types import SimpleNamespace

import aiohttp
from aiohttp.connector import AddrInfoType, SocketFactoryType

from llm_operator.gateway.proxy import Broken


@dataclass(frozen=True)
class UpstreamSettings:
    """Bounds of the connections to replicas."""

    connect_timeout: float = 5.0
    tries: int = 3
    """Attempts per request, over the ready replicas, while nothing has reached the client (see
    `proxy.should_retry`)."""
    read_timeout: float = 300.0
    """Most seconds between two bytes of an answer, the first included. A non-streaming `/generate` sends
    nothing until it is done: 300 s covers thousands of new tokens at tens of tokens a second; streams are
    never quiet that long (the serving server sends an SSE comment every 15 s)."""
    keepalive_idle: int = 30
    """TCP keep-alive: seconds of silence before the first probe, then one every `keepalive_interval`,
    and the connection is dropped after `keepalive_count` unanswered probes (60 s in all)."""
    keepalive_interval: int = 10
    keepalive_count: int = 3
    pool_idle: float = 4.0
    """Idle pooled connections are kept this long, under uvicorn's 5 s keep-alive on the replicas, so a
    request is rarely sent on a connection the replica is closing (and is sent again when it is)."""


class Attempt(SimpleNamespace):
    """Passed as aiohttp's trace context of one request: `reused` is set when it got a pooled connection."""

    reused: bool = False


def broken(error: aiohttp.ClientError) -> Broken:
    """How an attempt that raised `error` before its answer began ended (see `proxy.should_retry`)."""
    if isinstance(error, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return "connect"
    if isinstance(error, aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(error, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "disconnect"
    return "failed"


def keepalive_socket(settings: UpstreamSettings) -> SocketFactoryType:
    """The connector's socket factory: TCP sockets with keep-alive probes as `settings` say."""

    def make(info: AddrInfoType) -> socket.socket:
        family, kind, proto, _, _ = info
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, settings.keepalive_idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, settings.keepalive_interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, settings.keepalive_count)
        return sock

    return make


async def _on_reuse(_: aiohttp.ClientSession, context: SimpleNamespace, __: object) -> None:
    if isinstance(attempt := context.trace_request_ctx, Attempt):
        attempt.reused = True


def client_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    """A session that passes bodies and headers through untouched (no decompression, no added headers)."""
    tracing = aiohttp.TraceConfig()
    tracing.on_connection_reuseconn.append(_on_reuse)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=0,
            ttl_dns_cache=300,
            keepalive_timeout=settings.pool_idle,
            socket_factory=keepalive_socket(settings),
        ),
        timeout=aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
        ),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        trace_configs=[tracing],
    )
