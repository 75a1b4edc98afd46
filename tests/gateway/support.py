"""Loopback servers for the gateway tests: an ASGI app (the real gateway app, or the dev stack's stand-in
upstream, `llm_devstack.upstream.StandInUpstream`) under uvicorn on a free port, and a polling wait."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable

import uvicorn
from starlette.types import ASGIApp
from uvicorn.config import HTTPProtocolType


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
