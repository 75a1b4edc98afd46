"""`python -m llm_operator.gateway`: the gateway (uvicorn) fed by the cluster watcher."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from llm_operator import logs
from llm_operator.gateway.app import Gateway, GatewaySettings
from llm_operator.gateway.auth import DEFAULT_INTERNAL_CIDRS, AccessPolicy
from llm_operator.gateway.hold import HoldLimits
from llm_operator.gateway.watch import ClusterWatcher, PodReader, ScaleWaker
from llm_operator.kube import Credentials, Kube, add_cluster_flags

log = logging.getLogger("llm_operator.gateway")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    hold, gateway = HoldLimits(), GatewaySettings()
    p = argparse.ArgumentParser(prog="python -m llm_operator.gateway", description=__doc__)
    add_cluster_flags(p, "serve only this namespace's endpoints")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--path-prefix", default=gateway.path_prefix, help="path routing: <prefix>/<ns>/<name>/..."
    )
    p.add_argument("--max-held", type=int, default=hold.max_waiting, help="held requests per endpoint")
    p.add_argument(
        "--hold-timeout", type=float, default=hold.timeout, help="default seconds to hold a request"
    )
    p.add_argument(
        "--max-hold-timeout", type=float, default=hold.max_timeout, help="cap on X-Scale-Up-Timeout"
    )
    p.add_argument("--retry-after", type=int, default=hold.retry_after, help="Retry-After of a refused hold")
    p.add_argument("--keepalive-seconds", type=float, default=gateway.keepalive_seconds)
    p.add_argument(
        "--internal-cidr",
        action="append",
        dest="internal_cidrs",
        help="addresses inside the cluster network, for private endpoints (repeatable; default: "
        "private ranges and loopback)",
    )
    p.add_argument(
        "--trust-forwarded",
        action="store_true",
        help="judge private access by Forwarded/X-Forwarded-For too, instead of refusing proxied requests",
    )
    p.add_argument(
        "--token-refresh-seconds", type=float, default=30.0, help="re-read token Secrets this often"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    hold = HoldLimits(
        max_waiting=args.max_held,
        timeout=args.hold_timeout,
        max_timeout=args.max_hold_timeout,
        retry_after=args.retry_after,
    )
    access = AccessPolicy.from_cidrs(args.internal_cidrs or DEFAULT_INTERNAL_CIDRS, args.trust_forwarded)
    return GatewaySettings(
        path_prefix=args.path_prefix, hold=hold, access=access, keepalive_seconds=args.keepalive_seconds
    )


def server_config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    """uvicorn as the gateway runs it: httptools, no access log, no header rewriting of its own.

    `proxy_headers` is off because the gateway judges Forwarded/X-Forwarded-For itself (`--trust-forwarded`);
    the server and date headers are off because proxied answers carry the replica's own.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http="httptools",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        lifespan="on",
        timeout_graceful_shutdown=30,
    )


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop (asyncio's own loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover (a dependency on Linux)
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


async def run(args: argparse.Namespace) -> None:
    credentials = Credentials.load(args.kubeconfig, args.context)
    async with Kube(credentials) as kube:
        gateway = Gateway(settings_from(args), ScaleWaker(kube), pods=PodReader(kube))
        watcher = ClusterWatcher(
            credentials,
            kube,
            gateway.set_table,
            namespaces=args.namespaces,
            token_refresh_seconds=args.token_refresh_seconds,
        )
        watching = asyncio.create_task(watcher.run(), name="watch")
        synced = asyncio.create_task(watcher.synced.wait())
        synced.add_done_callback(lambda _: setattr(gateway, "ready", True))
        try:
            await uvicorn.Server(server_config(gateway, args.host, args.port)).serve()
        finally:
            for task in (watching, synced):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logs.configure(getattr(logging, args.log_level.upper()))
    run_loop(run(args))


if __name__ == "__main__":
    main()
