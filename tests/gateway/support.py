"""Loopback servers for the gateway tests: the real gateway app under uvicorn, and a stand-in upstream.

`StandInUpstream` is a small starlette app playing a serving replica (it is not the serving server): TGI-style
`/generate` (JSON echo of what it received) and `/generate_stream` (SSE, one event per token, optionally
paused on a gate so tests can see events arrive one by one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp
from uvicorn.config import HTTPProtocolType

from tests.cluster.operator_support import GatewayPorts, wait_for


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, http: type[asyncio.Protocol] | HTTPProtocolType = "auto") -> AsyncIterator[str]:
    """Run `app` under uvicorn on a free 127.0.0.1 port, with protocol `http`; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=http, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started, "uvicorn started")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task
        sock.close()


async def until(condition: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    """Poll `condition` every 10 ms, at most `seconds`."""
    for _ in range(int(seconds * 100)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"not within {seconds}s: {what}")


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


class StandaloneGateway(GatewayPorts):
    """The gateway process (`tests.gateway.standalone`: the gateway's own flags and servers, the routing
    table given as `--route` flags) on free loopback ports. Started, it is ready once its admin port
    answers `/readyz`."""

    def __init__(self, log: Path, *args: str) -> None:
        flags = ["--host=127.0.0.1", "--log-level=warning"]
        super().__init__("tests.gateway.standalone", log, [*flags, *args])

    def start(self) -> Self:
        super().start()
        wait_for(self.ready, 15, f"the gateway ready (log: {self.log})", interval=0.05)
        return self

    def rss(self) -> int:
        """The process's resident memory, bytes (VmRSS of /proc/PID/status)."""
        assert self.popen is not None
        return vm_rss(self.popen.pid)


def vm_rss(pid: int) -> int:
    """VmRSS of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")
