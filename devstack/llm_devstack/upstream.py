"""A stand-in serving replica for the gateway's tests and benchmark (it is not the serving server).

`StandInUpstream` is a small starlette app: TGI-style `/generate` (a JSON echo of what it received) and
`/generate_stream` (SSE, one event per token, optionally paused on a gate so that a test can see events
arrive one by one), and `/health`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class StandInUpstream:
    """A stand-in serving replica; records what it received."""

    def __init__(self, tokens: int = 3) -> None:
        self.tokens = tokens
        self.gate: asyncio.Event | None = None
        self.received: list[dict[str, Any]] = []
        self.stream_closed = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route("/generate", self.generate, methods=["POST"]),
                Route("/generate_stream", self.generate_stream, methods=["POST"]),
                Route("/health", lambda _: Response(b""), methods=["GET"]),
            ]
        )

    async def _record(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        seen = {
            "path": request.url.path,
            "query": request.url.query,
            "headers": dict(request.headers),
            "body": body.decode(),
        }
        self.received.append(seen)
        return seen

    async def generate(self, request: Request) -> Response:
        seen = await self._record(request)
        return JSONResponse({"generated_text": "hello world", "seen": seen}, headers={"x-upstream": "1"})

    async def generate_stream(self, request: Request) -> Response:
        await self._record(request)

        async def events() -> AsyncIterator[bytes]:
            try:
                for i in range(1, self.tokens + 1):
                    last = i == self.tokens
                    event = {
                        "index": i,
                        "token": {"id": i, "text": f" t{i}", "logprob": -0.1, "special": False},
                        "generated_text": "".join(f" t{j}" for j in range(1, i + 1)) if last else None,
                        "details": None,
                    }
                    yield b"data: " + json.dumps(event).encode() + b"\n\n"
                    if i == 1 and self.gate is not None:
                        await self.gate.wait()
            finally:
                self.stream_closed.set()

        return StreamingResponse(events(), media_type="text/event-stream")
