"""The admin port's app: `/metrics`, `/healthz` and `/readyz`, off the traffic port (the metrics name every
endpoint and count its requests; the autoscaler, Prometheus and the kubelet read them here)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from llm_operator.gateway.errors import error_body


class AdminApp:
    """ASGI app over the gateway's metric registry; `ready()` answers the readiness probe."""

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], bool]) -> None:
        self.registry, self.ready = registry, ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        response: Response
        if path == "/metrics":
            response = Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            response = PlainTextResponse("ok")
        elif path == "/readyz":
            ready = self.ready()
            response = PlainTextResponse("ok" if ready else "not ready", status_code=200 if ready else 503)
        else:
            body = error_body(f"no admin route {path!r}: /metrics, /healthz, /readyz", "not_found")
            response = Response(body, status_code=404, media_type="application/json")
        await response(scope, receive, send)
