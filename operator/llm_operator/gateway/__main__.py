"""`python -m llm_operator.gateway`: the gateway (uvicorn) fed by the cluster watcher."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, Literal

import uvicorn
from starlette.types import ASGIApp

from llm_operator import logs
from llm_operator.contract import ADMIN_PORT
from llm_operator.gateway import limits
from llm_operator.gateway.admin import AdminApp
from llm_operator.gateway.app import Gateway, GatewaySettings
from llm_operator.gateway.auth import AccessPolicy
from llm_operator.gateway.hold import HoldLimits
from llm_operator.gateway.upstream import UpstreamSettings
from llm_operator.gateway.watch import ClusterWatcher, PodReader, StatusWaker
from llm_operator.kube import Credentials, Kube, add_cluster_flags

log = logging.getLogger("llm_operator.gateway")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    hold, gateway = HoldLimits(), GatewaySettings()
    p = argparse.ArgumentParser(prog="python -m llm_operator.gateway", description=__doc__)
    add_cluster_flags(p, "serve only this namespace's endpoints")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--admin-port", type=int, default=ADMIN_PORT, help="/metrics, /healthz and /readyz")
    p.add_argument("--max-held", type=int, default=hold.max_waiting, help="held requests per endpoint")
    p.add_argument(
        "--max-held-per-client",
        type=int,
        default=hold.max_waiting_per_client,
        help="held requests per endpoint from one client (bearer token of a protected endpoint, else "
        "address; with --trust-forwarded the nearest forwarded address); default: a quarter of --max-held",
    )
    p.add_argument(
        "--max-held-total", type=int, default=hold.max_held_total, help="held requests over all endpoints"
    )
    p.add_argument(
        "--hold-timeout",
        type=float,
        default=hold.timeout,
        help="seconds to hold a request: the default and the cap of X-Scale-Up-Timeout",
    )
    p.add_argument("--retry-after", type=int, default=hold.retry_after, help="Retry-After of a refused hold")
    p.add_argument("--keepalive-seconds", type=float, default=gateway.keepalive_seconds)
    p.add_argument(
        "--upstream-read-timeout",
        type=float,
        default=gateway.upstream.read_timeout,
        help="most seconds between two bytes of a replica's answer, the first included (then 504, or an "
        "SSE error event)",
    )
    p.add_argument(
        "--upstream-tries",
        type=int,
        default=gateway.upstream.tries,
        help="replicas tried per request while nothing was answered (connect errors, 503, closed)",
    )
    p.add_argument(
        "--internal-cidr",
        action="append",
        dest="internal_cidrs",
        default=[],
        help="addresses inside the cluster network, for private endpoints: the pod and service CIDRs "
        "(repeatable; none: private endpoints refuse every caller)",
    )
    p.add_argument(
        "--trust-forwarded",
        action="store_true",
        help="judge private access by Forwarded/X-Forwarded-For too, instead of refusing proxied requests",
    )
    limits.add_flags(p)
    p.add_argument("--log-level", default="info", choices=logs.LEVELS)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> GatewaySettings:
    hold = HoldLimits(
        max_waiting=args.max_held,
        max_waiting_per_client=args.max_held_per_client,
        max_held_total=args.max_held_total,
        timeout=args.hold_timeout,
        retry_after=args.retry_after,
    )
    access = AccessPolicy.from_cidrs(args.internal_cidrs, args.trust_forwarded)
    if not access.internal:
        log.warning("no --internal-cidr (gateway.internalCIDRs) given: private endpoints refuse every caller")
    return GatewaySettings(
        hold=hold,
        access=access,
        keepalive_seconds=args.keepalive_seconds,
        upstream=UpstreamSettings(read_timeout=args.upstream_read_timeout, tries=args.upstream_tries),
        limits=limits.from_args(args),
    )


def server_config(
    app: ASGIApp, host: str, port: int, bounds: limits.ServerLimits, lifespan: Literal["on", "off"] = "on"
) -> uvicorn.Config:
    """uvicorn as the gateway runs it: httptools within `bounds`, no access log, no header rewriting.

    `proxy_headers` is off because the gateway judges Forwarded/X-Forwarded-For itself (`--trust-forwarded`);
    the server and date headers are off because proxied answers carry the replica's own.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=limits.bounded_protocol(bounds),
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        lifespan=lifespan,
        timeout_keep_alive=bounds.idle_seconds,
        timeout_graceful_shutdown=bounds.shutdown_grace_seconds,
    )


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve` (two servers share them)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


HELD_MARGIN_SECONDS = 1.0
"""Requests still held this long before the shutdown grace ends are refused, so none is cut unanswered."""


async def serve(gateway: Gateway, host: str, port: int, admin_port: int) -> None:
    """The traffic server and the admin server until SIGTERM or SIGINT, then the drain.

    On the signal the traffic port stops accepting and `/readyz` answers 503. Streams have
    `shutdown_grace_seconds` to finish; held requests keep waiting for their replica until
    `HELD_MARGIN_SECONDS` before that, then get 503 + Retry-After (`hold.Draining`; an SSE error event once
    their stream has begun) so their clients retry another gateway replica. The admin port serves until then.
    """
    bounds = gateway.settings.limits
    traffic = _Server(server_config(gateway, host, port, bounds))
    ready = AdminApp(gateway.metrics.registry, lambda: gateway.ready and not traffic.should_exit)
    admin = _Server(server_config(ready, host, admin_port, bounds, lifespan="off"))
    loop = asyncio.get_running_loop()
    last_holds = max(0.0, bounds.shutdown_grace_seconds - HELD_MARGIN_SECONDS)

    def stop(sig: signal.Signals) -> None:
        if not traffic.should_exit:
            loop.call_later(last_holds, gateway.holds.drain)
        traffic.handle_exit(sig, None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    admin_serving = asyncio.create_task(admin.serve(), name="admin")
    try:
        await traffic.serve()
    finally:
        admin.should_exit = True
        await admin_serving
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


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
        gateway = Gateway(settings_from(args), StatusWaker(kube), pods=PodReader(kube))
        watcher = ClusterWatcher(credentials, gateway.set_table, namespaces=args.namespaces)
        watching = asyncio.create_task(watcher.run(), name="watch")
        synced = asyncio.create_task(watcher.synced.wait())
        synced.add_done_callback(lambda _: setattr(gateway, "ready", True))
        try:
            await serve(gateway, args.host, args.port, args.admin_port)
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
