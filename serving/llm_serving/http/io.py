"""HTTP plumbing: read a JSON body as TGI's axum would, write SSE, answer errors, notice disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections.abc import AsyncGenerator, Awaitable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic import ValidationError as PydanticError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from llm_serving.errors import (
    BadJsonError,
    BodyTooLargeError,
    BodyTypeError,
    MediaTypeError,
    ServingError,
)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

KEEP_ALIVE_SECONDS = 15.0
# curl -d sends form-urlencoded by default; TGI's documented curl calls would otherwise fail.
ACCEPTED_MEDIA_TYPES = ("", "application/json", "application/x-www-form-urlencoded", "text/plain")


def error_response(error: ServingError) -> Response:
    """The one place an error becomes an HTTP answer."""
    if error.plain:
        return PlainTextResponse(error.text, status_code=error.status, headers=error.headers())
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


# A `\u` escape of a UTF-16 surrogate: only then can a parsed string hold a lone one (checked after parsing).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    """Numbers beyond float64 are an error, as in serde_json (Python would read them as infinity)."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def parse_json(raw: bytes) -> Any:
    """Parse a body as TGI's serde_json does: no NaN/Infinity, no out-of-range numbers, no lone surrogates;
    nesting too deep for the parser is a syntax error too. Raises `BadJsonError` (400)."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
        if _SURROGATE_ESCAPE.search(raw):
            json.dumps(data, ensure_ascii=False).encode()
    except RecursionError as exc:
        raise BadJsonError("recursion limit exceeded") from exc
    except UnicodeEncodeError as exc:
        raise BadJsonError("lone surrogate in a \\u escape") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadJsonError(str(exc)) from exc
    return data


async def read_json(request: Request, model: type[M], max_bytes: int) -> M:
    """Parse the body into `model`: 415, 413, 400 or 422 (plain text) on failure."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ACCEPTED_MEDIA_TYPES and not media.endswith("+json"):
        raise MediaTypeError()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLargeError()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLargeError()
        chunks.append(chunk)
    data = parse_json(b"".join(chunks))
    try:
        return model.model_validate(data)
    except PydanticError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BodyTypeError(f"{where}: {first['msg']}") from exc


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising `ClientDisconnected`) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected()
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def sse_data(payload: Any) -> str:
    """One SSE event: `data: ` (with the space clients need) + compact JSON."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n"


SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no"}
"""axum's SSE headers and TGI's `X-Accel-Buffering`. The content type is exactly `text/event-stream`: with a
media type Starlette would add `; charset=utf-8`, which older `@huggingface/inference` releases refuse."""


class EventStream(StreamingResponse):
    """An SSE response that sends keep-alives while idle and cancels the source when the client leaves;
    `headers` go out beside `SSE_HEADERS`."""

    def __init__(self, events: AsyncGenerator[str, None], headers: Mapping[str, str] | None = None) -> None:
        super().__init__(events, headers={**(headers or {}), **SSE_HEADERS})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(_disconnected(receive))
        await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not pump.done():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump
            return
        watcher.cancel()
        with contextlib.suppress(OSError):
            pump.result()

    async def _pump(self, send: Send) -> None:
        pending: asyncio.Future[str] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(self._events))
                done, _ = await asyncio.wait({pending}, timeout=KEEP_ALIVE_SECONDS)
                if not done:
                    await send({"type": "http.response.body", "body": b":\n\n", "more_body": True})
                    continue
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    break
                pending = None
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                await asyncio.wait({pending})
            await self._events.aclose()
