"""`python -m llm_operator`: the operator (kopf watches, reconcile workers, leader election, autoscaler)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence

import kopf
from kopf._core.engines.peering import Identity  # the type of kopf.operator's identity
from prometheus_client import start_http_server

from llm_operator import logs
from llm_operator.autoscale.decide import Tuning
from llm_operator.autoscale.loop import AutoscalerSettings, run_autoscaler
from llm_operator.autoscale.sources import (
    GatewaySource,
    MetricsSource,
    PrometheusSource,
    gateway_pod_urls,
    static_urls,
)
from llm_operator.contract import ADMIN_PORT, HF_ENDPOINT_ENV
from llm_operator.controller import RESYNC_SECONDS, Controller
from llm_operator.handlers import build_registry
from llm_operator.kube import Credentials, Kube, add_cluster_flags
from llm_operator.leader import LeaderElector
from llm_operator.settings import HUB_URL, IMAGE_POLICIES, Settings

log = logging.getLogger("llm_operator")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python -m llm_operator", description=__doc__)
    add_cluster_flags(p, "watch only this namespace")
    p.add_argument("--image", default=defaults.image, help="default serving image")
    p.add_argument("--gateway-url", default=defaults.gateway_url, help="base URL of the gateway")
    p.add_argument(
        "--system-namespace",
        default=os.environ.get("POD_NAMESPACE", defaults.system_namespace),
        help="namespace of the operator and gateway",
    )
    p.add_argument(
        "--gateway-namespace",
        help="namespace of the gateway pods, the only pods endpoints' NetworkPolicies admit "
        "(default: --system-namespace)",
    )
    p.add_argument(
        "--gateway-label",
        action="append",
        type=label,
        dest="gateway_labels",
        metavar="KEY=VALUE",
        help="a label of the gateway pods (repeatable; default: "
        + ",".join(f"{k}={v}" for k, v in defaults.gateway_labels.items())
        + ")",
    )
    p.add_argument(
        "--operator-label",
        action="append",
        type=label,
        dest="operator_labels",
        metavar="KEY=VALUE",
        help="a label of the operator's own pods, admitted to the serving port to read /status (repeatable; "
        "default: " + ",".join(f"{k}={v}" for k, v in defaults.operator_labels.items()) + ")",
    )
    p.add_argument(
        "--hf-endpoint",
        default=defaults.hf_endpoint,
        help=f"the Hub's base URL, where revisions are resolved and serving pods download from (as "
        f"{HF_ENDPOINT_ENV}); default: {HUB_URL}",
    )
    p.add_argument(
        "--image-policy",
        choices=IMAGE_POLICIES,
        default=defaults.image_policy,
        help="which spec.image endpoints may name: any, only --image (default-only), or --allowed-image ones",
    )
    p.add_argument(
        "--allowed-image",
        action="append",
        dest="allowed_images",
        default=[],
        metavar="PATTERN",
        help="an image endpoints may name under --image-policy=allow-list (fnmatch pattern; repeatable)",
    )
    p.add_argument(
        "--serving-egress-port",
        action="append",
        type=int,
        dest="serving_egress_ports",
        metavar="PORT",
        help="a TCP port serving pods may connect to anywhere, besides DNS (repeatable; default: "
        + ",".join(map(str, defaults.serving_egress_ports))
        + "; 0 alone: DNS only)",
    )
    p.add_argument("--termination-grace-seconds", type=int, default=defaults.termination_grace_seconds)
    p.add_argument("--startup-seconds", type=int, default=defaults.startup_seconds)
    p.add_argument("--workers", type=int, default=16, help="concurrent reconcile passes")
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=RESYNC_SECONDS,
        help="full pass of every endpoint this often (a rotated API key reaches the gateway within it)",
    )
    p.add_argument(
        "--no-leader-election",
        dest="leader_election",
        action="store_false",
        help="act without holding the Lease (a single replica only)",
    )
    p.add_argument("--lease-name", default="llm-operator")
    p.add_argument("--lease-namespace", help="namespace of the Lease (default: --system-namespace)")
    p.add_argument("--lease-seconds", type=int, default=15)
    p.add_argument("--identity", default=f"{socket.gethostname()}-{os.getpid()}", help="this replica's name")
    p.add_argument("--liveness", help="kopf liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics port (0: off)")
    scaling = p.add_argument_group("autoscaler (runs in the replica that holds the Lease)")
    scaling.add_argument(
        "--prometheus-url", help="read request metrics through this Prometheus server instead of the gateways"
    )
    scaling.add_argument(
        "--gateway-metrics-url",
        action="append",
        default=[],
        help="scrape this gateway metrics URL (repeatable; default: the ready gateway pods)",
    )
    scaling.add_argument(
        "--gateway-metrics-port", type=int, default=ADMIN_PORT, help="gateway pods' admin (metrics) port"
    )
    tuning = Tuning()
    scaling.add_argument("--autoscale-interval", type=float, default=AutoscalerSettings().interval)
    scaling.add_argument("--autoscale-window", type=float, default=tuning.window, help="seconds averaged")
    scaling.add_argument(
        "--scale-down-stabilization",
        type=float,
        default=tuning.scale_down_stabilization,
        help="seconds of recommendations a scale-down respects",
    )
    p.add_argument("--log-level", default="info", choices=logs.LEVELS)
    return p.parse_args(argv)


def label(text: str) -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY, VALUE)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def settings_from(args: argparse.Namespace) -> Settings:
    """The operator's Settings from its flags (a flag left out keeps the dataclass default)."""
    defaults = Settings()
    egress = args.serving_egress_ports
    return Settings(
        image=args.image,
        gateway_url=args.gateway_url,
        system_namespace=args.system_namespace,
        gateway_namespace=args.gateway_namespace,
        gateway_labels=dict(args.gateway_labels) if args.gateway_labels else defaults.gateway_labels,
        operator_labels=dict(args.operator_labels) if args.operator_labels else defaults.operator_labels,
        hf_endpoint=args.hf_endpoint or None,
        termination_grace_seconds=args.termination_grace_seconds,
        startup_seconds=args.startup_seconds,
        image_policy=args.image_policy,
        allowed_images=tuple(args.allowed_images),
        serving_egress_ports=defaults.serving_egress_ports
        if egress is None
        else tuple(port for port in egress if port),
    )


def metrics_source(args: argparse.Namespace, kube: Kube, settings: Settings) -> MetricsSource:
    """Where the autoscaler reads request metrics: Prometheus, listed gateways, or the gateway pods."""
    if args.prometheus_url:
        return PrometheusSource(args.prometheus_url)
    if args.gateway_metrics_url:
        return GatewaySource(static_urls(args.gateway_metrics_url))
    pods = gateway_pod_urls(
        kube, settings.gateway_pods_namespace, settings.gateway_labels, args.gateway_metrics_port
    )
    return GatewaySource(pods)


def autoscaler_settings(args: argparse.Namespace) -> AutoscalerSettings:
    tuning = Tuning(window=args.autoscale_window, scale_down_stabilization=args.scale_down_stabilization)
    return AutoscalerSettings(
        interval=args.autoscale_interval, tuning=tuning, namespaces=tuple(args.namespaces)
    )


async def run(args: argparse.Namespace) -> None:
    settings = settings_from(args)
    credentials = Credentials.load(args.kubeconfig, args.context)
    async with Kube(credentials) as kube:
        elector = None
        if args.leader_election:
            elector = LeaderElector(
                kube,
                args.lease_namespace or args.system_namespace,
                args.lease_name,
                args.identity,
                lease_seconds=args.lease_seconds,
                retry_seconds=max(1.0, args.lease_seconds / 5),
            )
        controller = Controller(
            kube,
            settings,
            workers=args.workers,
            elector=elector,
            identity=args.identity,
            resync_seconds=args.resync_seconds,
        )
        registry = build_registry(controller, credentials)
        work = asyncio.create_task(controller.run(), name="controller")
        scaler = asyncio.create_task(
            run_autoscaler(
                kube,
                metrics_source(args, kube, settings),
                autoscaler_settings(args),
                leading=controller.leading,
            ),
            name="autoscaler",
        )
        log.info("starting", extra={"identity": args.identity, "namespaces": args.namespaces or "all"})
        try:
            await kopf.operator(
                registry=registry,
                standalone=True,
                # kopf's default identity calls getpass.getuser(), which fails for a UID with no passwd entry
                identity=Identity(args.identity),
                clusterwide=not args.namespaces,
                namespaces=args.namespaces,
                liveness_endpoint=args.liveness,
            )
        finally:
            for task in (work, scaler):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            log.info("stopped", extra={"identity": args.identity})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logs.configure(getattr(logging, args.log_level.upper()))
    if args.metrics_port:
        start_http_server(args.metrics_port)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
