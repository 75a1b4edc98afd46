"""The gateway's answer to its client: started plainly, or early as SSE while held; relayed chunk by chunk.

Once a held SSE response has started, a refusal arrives as an SSE error event on the 200 stream, as TGI
reports stream errors; a replica that breaks off mid-answer ends it as well as its kind allows.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
from starlette.types import Message, Receive, Send

from llm_operator.gateway import headers
from llm_operator.gateway.coldstart import ColdStart
from llm_operator.gateway.errors import GatewayError, error_body

log = logging.getLogger("llm_operator.gateway")

KEEPALIVE = b": waiting for a replica\n\n"


async def respond(
    send: Send,
    status: int,
    body: bytes,
    extra: dict[str, str] | None = None,
    content_type: bytes = b"application/json",
) -> None:
    """A whole response of the gateway's own."""
    raw = headers.own(content_type, len(body), extra)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def refuse(send: Send, error: GatewayError) -> None:
    """A refusal as a whole response: its status, TGI's error body, its headers."""
    await respond(send, error.status, error_body(str(error), error.error_type), error.headers())


class Exchange:
    """One client response: started plainly, or early as SSE while held."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.sse = False
        self.status = 200
        self.cold_start: ColdStart | None = None
        """Set when this request was held through a wake."""

    async def start_sse(self) -> None:
        await self.send({"type": "http.response.start", "status": 200, "headers": headers.SSE_HEADERS})
        self.started = self.sse = True
        await self.keepalive()

    async def keepalive(self) -> None:
        if self.sse:
            await self._body(KEEPALIVE, more=True)

    async def _body(self, chunk: bytes, more: bool) -> None:
        message: Message = {"type": "http.response.body", "body": chunk, "more_body": more}
        await self.send(message)

    async def fail(self, error: GatewayError) -> None:
        """Answer a refusal: a response of its own, or the error event that ends a held SSE stream (counted
        with the status it would have had)."""
        self.status = error.status
        if self.sse:
            await self._body(b"data: " + error_body(str(error), error.error_type) + b"\n\n", more=False)
            return
        await refuse(self.send, error)

    async def relay(self, upstream: aiohttp.ClientResponse) -> None:
        """Pass the upstream answer on, chunk by chunk as it arrives."""
        if not self.started:
            self.status = upstream.status
            raw = headers.downstream(upstream.raw_headers)
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


async def disconnected(receive: Receive) -> None:
    """Return once the client has gone away."""
    while (await receive())["type"] != "http.disconnect":
        continue
