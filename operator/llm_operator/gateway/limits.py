"""What one client may cost the gateway: bounds on headers, bodies, read times and connections.

uvicorn with httptools bounds none of these by itself (a header may grow until the pod is OOM-killed, a
connection that never finishes its headers stays open), so `bounded_protocol` subclasses its httptools
protocol to count header bytes, arm a per-connection header deadline and refuse connections over the caps,
and `read_body` bounds body size, body read time and the bytes of all buffered bodies (`BodyBudget`). Bodies
are buffered whole (a request may be held, and is sent again to another replica when connecting fails), so
the budget, held requests included, bounds their memory: a request that would exceed it gets 503. Each
refusal is a class of its own (`BodyTooLarge`, `TooManyConnections`, ...).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from starlette.types import Receive
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.server import ServerState

from llm_operator.gateway import headers
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


class ClientGone(GatewayError):
    """The client went away before its request body was complete."""

    status = 499
    error_type = "client_closed"


class BodyRefused(GatewayError):
    """A request body the gateway stops reading; the connection closes after the answer."""

    def headers(self) -> dict[str, str]:
        return {"connection": "close"}


class BodyTooLarge(BodyRefused):
    """A body over `max_body_bytes`."""

    status = 413
    error_type = "payload_too_large"


class BodyTooSlow(BodyRefused):
    """A body not received within `body_seconds`."""

    status = 408
    error_type = "request_timeout"


class BodiesOverBudget(BodyRefused):
    """A body that does not fit in what is left of `body_budget_bytes`."""

    status = 503
    error_type = "overloaded"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "retry-after": "1"}


class ConnectionRefused(GatewayError):
    """A connection closed unread after its answer (written by the protocol, see `BoundedHttpTools`)."""

    def headers(self) -> dict[str, str]:
        return {"connection": "close"}


class TooManyConnections(ConnectionRefused):
    """Over `max_connections`, or `max_connections_per_client` from the peer."""

    status = 503
    error_type = "overloaded"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "retry-after": "1"}


class HeadersTooSlow(ConnectionRefused):
    """A request's headers not complete within `header_seconds`."""

    status = 408
    error_type = "request_timeout"


class HeadersTooLarge(ConnectionRefused):
    """A request line and headers over `header_bytes`."""

    status = 431
    error_type = "request_header_fields_too_large"


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


async def read_body(receive: Receive, bounds: ServerLimits, budget: BodyBudget) -> bytes:
    """The whole body, within the body bounds: BodyTooLarge over `max_body_bytes`, BodyTooSlow past
    `body_seconds`, BodiesOverBudget when the buffered bodies would exceed their budget, ClientGone when
    the client leaves first. The body's bytes stay taken from `budget` until the caller gives them back."""
    chunks, size, more = [], 0, True
    try:
        async with asyncio.timeout(bounds.body_seconds):
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone("client went away")
                chunk = message.get("body", b"")
                if size + len(chunk) > bounds.max_body_bytes:
                    raise BodyTooLarge(f"request body over {bounds.max_body_bytes} bytes")
                if not budget.take(len(chunk)):
                    raise BodiesOverBudget("the gateway holds as many request bodies as it may; retry later")
                size += len(chunk)
                chunks.append(chunk)
                more = message.get("more_body", False)
    except TimeoutError:
        budget.give(size)
        raise BodyTooSlow(f"request body not received within {bounds.body_seconds:g}s") from None
    except BaseException:
        budget.give(size)
        raise
    return b"".join(chunks)


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


def _answer(refused: ConnectionRefused) -> bytes:
    """A whole HTTP/1.1 answer in TGI's error shape, with the refusal's headers."""
    body = error_body(str(refused), refused.error_type)
    head = b"".join(
        k + b": " + v + b"\r\n" for k, v in headers.own(b"application/json", len(body), refused.headers())
    )
    return STATUS_LINE[refused.status] + head + b"\r\n" + body


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
            self._refuse(_answer(TooManyConnections("too many connections")))
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
        self._refuse(_answer(HeadersTooSlow(f"request headers not received within {seconds}s")))

    def _too_large(self) -> None:
        message = f"request headers over {self.limits.header_bytes} bytes"
        self._refuse(_answer(HeadersTooLarge(message)))

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
