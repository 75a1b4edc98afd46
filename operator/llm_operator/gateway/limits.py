"""What one client may cost the gateway: bounds on headers, bodies, read times and connections.

uvicorn with httptools bounds none of these by itself (a header may grow until the pod is OOM-killed, a
connection that never finishes its headers stays open), so `bounded_protocol` subclasses its httptools
protocol to count header bytes, arm a per-connection header deadline and refuse connections over the caps,
and the app bounds body size, body read time and the bytes of all buffered bodies (`BodyBudget`). Bodies
are buffered whole (a request may be held, and is sent again to another replica when connecting fails), so
the budget, held requests included, bounds their memory: a request that would exceed it gets 503.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.server import ServerState

from llm_operator.gateway.errors import GatewayError, error_body
from llm_operator.gateway.origin_form import OriginFormTarget

KIB, MIB = 1024, 1024 * 1024


def _bound(default: int | float, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerLimits:
    """The gateway server's bounds; each is a flag of the same name (`--header-bytes`, ...)."""

    header_bytes: int = _bound(32 * KIB, "request line and headers of a request, bytes (more: 431)")
    header_seconds: float = _bound(
        30.0, "seconds from a connection's start or last answer to complete headers (then closed, 408)"
    )
    body_seconds: float = _bound(60.0, "seconds to receive a whole request body (more: 408)")
    max_body_bytes: int = _bound(4_000_000, "bytes of one request body (more: 413)")
    body_budget_bytes: int = _bound(
        64 * MIB, "bytes of all request bodies buffered at once, held ones included (more: 503)"
    )
    max_connections: int = _bound(2048, "client connections at once (more: 503 and closed unread)")
    max_connections_per_client: int = _bound(
        512, "client connections at once from one peer address (behind a proxy, the proxy's)"
    )
    idle_seconds: int = _bound(5, "seconds a keep-alive connection may wait for its next request")
    shutdown_grace_seconds: int = _bound(
        110, "seconds streams and held requests get to finish after SIGTERM (the chart's: its grace less 10)"
    )


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `ServerLimits` field, its default the field's."""
    group = parser.add_argument_group("bounds")
    for bound in fields(ServerLimits):
        flag = "--" + bound.name.replace("_", "-")
        group.add_argument(flag, type=type(bound.default), default=bound.default, help=bound.metadata["help"])


def from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{bound.name: getattr(args, bound.name) for bound in fields(ServerLimits)})


class BodyRefused(GatewayError):
    """A request body the gateway stops reading; the connection closes after the answer."""

    def __init__(self, status: int, error_type: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.error_type, self.retry_after = status, error_type, retry_after

    def headers(self) -> dict[str, str]:
        extra = {} if self.retry_after is None else {"retry-after": str(self.retry_after)}
        return {"connection": "close", **extra}


class BodyBudget:
    """Bytes of request bodies buffered now, against a capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = capacity, 0

    def take(self, size: int) -> bool:
        """Reserve `size` bytes; False (nothing reserved) when they do not fit."""
        if self.used + size > self.capacity:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class Connections:
    """Client connections admitted now, in all and per peer address."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.by_peer: Counter[str] = Counter()

    def admit(self, peer: str) -> bool:
        if self.by_peer.total() >= self.limits.max_connections:
            return False
        if self.by_peer[peer] >= self.limits.max_connections_per_client:
            return False
        self.by_peer[peer] += 1
        return True

    def leave(self, peer: str) -> None:
        self.by_peer[peer] -= 1
        if not self.by_peer[peer]:
            del self.by_peer[peer]


def _answer(status: int, message: str, error_type: str, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer in TGI's error shape that closes the connection."""
    body = error_body(message, error_type)
    head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body)
    return STATUS_LINE[status] + head + extra + b"\r\n" + body


LINGER_SECONDS = 2.0
"""How long a refused connection's input is still read and dropped before it is closed."""


class BoundedHttpTools(OriginFormTarget):
    """uvicorn's httptools protocol with the connection caps, the header size bound and the header deadline.

    The header deadline runs from the connection's start, and again from each answer's end, until a request's
    headers are complete; bytes that arrive meanwhile do not extend it (they do reset uvicorn's keep-alive
    timer). Header bytes are counted as they arrive: an unfinished request head is at most the bytes received
    since the read in which it began (pipelined requests may be over-counted by that read's earlier part).
    """

    limits: ClassVar[ServerLimits]
    admitted: ClassVar[Connections]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._peer: str | None = None
        self._closed = False
        self._head_open = False
        self._head_seen = self._head_size = self._read = 0
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = self.client[0] if self.client else ""
        if not self.admitted.admit(peer):
            self._refuse(_answer(503, "too many connections", "overloaded", b"retry-after: 1\r\n"))
            return
        self._peer = peer
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._peer is not None:
            self.admitted.leave(self._peer)
            self._peer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._read = len(data)
        if self._head_open:
            self._head_seen += self._read
        super().data_received(data)
        if self._head_open and self._head_seen > self.limits.header_bytes:
            self._too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open, self._head_seen, self._head_size = True, self._read, 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._disarm()
        if self._head_size > self.limits.header_bytes:
            self._too_large()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._closed:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._closed:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.header_seconds, self._headers_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if not self._head_open:  # nothing of a request came: just close
            self._refuse(b"")
            return
        seconds = f"{self.limits.header_seconds:g}"
        self._refuse(_answer(408, f"request headers not received within {seconds}s", "request_timeout"))

    def _too_large(self) -> None:
        message = f"request headers over {self.limits.header_bytes} bytes"
        self._refuse(_answer(431, message, "request_header_fields_too_large"))

    def _refuse(self, answer: bytes) -> None:
        """Close the connection unread, after `answer` unless an answer is already being written on it."""
        self._closed = True
        self._disarm()
        if self.transport.is_closing():
            return
        if answer and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(answer)
        if not answer or not self.transport.can_write_eof():
            self.transport.close()
            return
        # A lingering close, as nginx does: closing with unread input would send a reset that can reach the
        # client before the answer does. Send the answer and a FIN, drop what still arrives, close later.
        self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


def bounded_protocol(limits: ServerLimits) -> type[BoundedHttpTools]:
    """A protocol class for one uvicorn server (pass as `http=`): its own connection count, these bounds."""
    return type("BoundedHttpTools", (BoundedHttpTools,), {"limits": limits, "admitted": Connections(limits)})
