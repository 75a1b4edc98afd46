"""A small async Kubernetes REST client (aiohttp): the one door to the API server of the operator, its
autoscaler and the gateway.

Credentials come from a kubeconfig or the in-cluster service account, resolved once by the `kubernetes`
package's loaders (its only use); the same credentials log kopf in, so kopf's watches and our requests use one
identity. Every error status becomes a typed error of `kube.errors`.
"""

from __future__ import annotations

import argparse
import json
import ssl
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from prometheus_client import Counter

from llm_operator.kube.errors import APIUnavailableError, api_error
from llm_operator.objects import Manifest

PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "NetworkPolicy": "networkpolicies",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Secret": "secrets",
    "Pod": "pods",
    "Event": "events",
    "Lease": "leases",
    "LLMEndpoint": "llmendpoints",
    "EndpointSlice": "endpointslices",
}
REQUESTS = Counter("llm_operator_api_requests_total", "Requests to the API server", ["method", "code"])
CONNECT_SECONDS = 10.0
STREAM_BUFFER = 2**22
"""Read buffer of a streamed answer; aiohttp reads lines (watch events) up to twice this long."""
TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def add_cluster_flags(parser: argparse.ArgumentParser, namespace_help: str) -> None:
    """--kubeconfig, --context and the repeatable -n/--namespace (into `namespaces`) of both commands."""
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)"
    )
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        dest="namespaces",
        help=f"{namespace_help} (repeatable; default: all namespaces)",
    )


@dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to prove who we are."""

    server: str
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    token: str | None = None
    token_path: str | None = None
    insecure: bool = False

    @classmethod
    def load(cls, kubeconfig: str | None = None, context: str | None = None) -> Credentials:
        """From the kubeconfig (explicit, $KUBECONFIG or ~/.kube/config), else the in-cluster account."""
        cfg = k8s_client.Configuration()
        try:
            k8s_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        except k8s_config.ConfigException:
            if kubeconfig:
                raise
            k8s_config.load_incluster_config(client_configuration=cfg)
        auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        token = auth.removeprefix("Bearer ").strip() if auth else None
        in_cluster = token is not None and TOKEN_FILE.exists() and not kubeconfig
        return cls(
            server=cfg.host.rstrip("/"),
            ca_path=cfg.ssl_ca_cert,
            cert_path=cfg.cert_file,
            key_path=cfg.key_file,
            token=token,
            token_path=str(TOKEN_FILE) if in_cluster else None,
            insecure=not cfg.verify_ssl,
        )

    def ssl_context(self) -> ssl.SSLContext | bool:
        """TLS settings for aiohttp."""
        if not self.server.startswith("https"):
            return False
        context = ssl.create_default_context(cafile=self.ca_path)
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.cert_path and self.key_path:
            context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def bearer(self) -> str | None:
        """The current token (a projected service-account token is re-read: it rotates)."""
        if self.token_path:
            return Path(self.token_path).read_text().strip()
        return self.token


def resource_path(
    api_version: str,
    kind: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The REST path of a collection or an object."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [base]
    if namespace:
        parts += ["namespaces", namespace]
    parts.append(PLURALS[kind])
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


class Kube:
    """JSON over HTTP to one API server; raises the typed errors of `kube.errors`."""

    def __init__(self, credentials: Credentials, *, connections: int = 64, timeout: float = 30.0) -> None:
        self.credentials = credentials
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.credentials.ssl_context(), limit=self._connections)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if token := self.credentials.bearer():
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Manifest:
        """One call; the decoded JSON answer, or a typed error."""
        headers = self._headers()
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        url = self.credentials.server + path
        try:
            async with self._ensure_session().request(
                method, url, params=params, data=data, headers=headers
            ) as response:
                text = await response.text()
        except (TimeoutError, aiohttp.ClientError) as error:
            REQUESTS.labels(method=method, code="error").inc()
            raise APIUnavailableError(f"{method} {path}: {error!r}") from error
        REQUESTS.labels(method=method, code=str(response.status)).inc()
        decoded = _decode(text)
        if response.status >= 400:
            raise api_error(response.status, decoded, f"{method} {path}")
        return decoded if isinstance(decoded, dict) else {}

    async def stream(
        self, path: str, params: dict[str, str], *, read_timeout: float
    ) -> AsyncGenerator[Manifest, None]:
        """A GET whose answer is a stream of JSON lines (a watch): each line decoded, or a typed error.

        No total timeout: the stream lasts as long as the server keeps it (a watch's `timeoutSeconds`);
        `read_timeout` bounds a silence. Close it with `contextlib.aclosing` to free the connection early."""
        url = self.credentials.server + path
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_SECONDS, sock_read=read_timeout)
        try:
            async with self._ensure_session().get(
                url, params=params, headers=self._headers(), timeout=timeout, read_bufsize=STREAM_BUFFER
            ) as response:
                REQUESTS.labels(method="WATCH", code=str(response.status)).inc()
                if response.status >= 400:
                    raise api_error(response.status, _decode(await response.text()), f"WATCH {path}")
                async for line in response.content:
                    if line.strip():
                        yield json.loads(line)
        except (TimeoutError, aiohttp.ClientError) as error:
            REQUESTS.labels(method="WATCH", code="error").inc()
            raise APIUnavailableError(f"WATCH {path}: {error!r}") from error
        except ValueError as error:  # a line that is not JSON, or longer than the buffer: it broke off
            raise APIUnavailableError(f"WATCH {path}: unreadable event: {error}") from error

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> Manifest:
        return await self.request("GET", resource_path(api_version, kind, namespace, name))

    async def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        labels: dict[str, str] | None = None,
        fields: dict[str, str] | None = None,
    ) -> list[Manifest]:
        params = {}
        if labels:
            params["labelSelector"] = ",".join(f"{k}={v}" for k, v in labels.items())
        if fields:
            params["fieldSelector"] = ",".join(f"{k}={v}" for k, v in fields.items())
        answer = await self.request("GET", resource_path(api_version, kind, namespace), params=params)
        items: list[Manifest] = answer.get("items") or []
        return items

    async def apply(self, body: Manifest, field_manager: str, *, force: bool = True) -> Manifest:
        """Server-side apply of a whole object."""
        meta = body["metadata"]
        path = resource_path(body["apiVersion"], body["kind"], meta.get("namespace"), meta["name"])
        params = {"fieldManager": field_manager, "force": "true" if force else "false"}
        return await self.request(
            "PATCH", path, params=params, body=body, content_type="application/apply-patch+yaml"
        )

    async def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Manifest,
        *,
        subresource: str | None = None,
        field_manager: str | None = None,
    ) -> Manifest:
        path = resource_path(api_version, kind, namespace, name, subresource)
        params = {"fieldManager": field_manager} if field_manager else None
        return await self.request(
            "PATCH", path, params=params, body=patch, content_type="application/merge-patch+json"
        )

    async def create(self, body: Manifest, field_manager: str | None = None) -> Manifest:
        path = resource_path(body["apiVersion"], body["kind"], body["metadata"].get("namespace"))
        params = {"fieldManager": field_manager} if field_manager else None
        return await self.request("POST", path, params=params, body=body)

    async def replace(self, body: Manifest, field_manager: str | None = None) -> Manifest:
        meta = body["metadata"]
        path = resource_path(body["apiVersion"], body["kind"], meta.get("namespace"), meta["name"])
        params = {"fieldManager": field_manager} if field_manager else None
        return await self.request("PUT", path, params=params, body=body)

    async def delete(
        self, api_version: str, kind: str, namespace: str | None, name: str, *, uid: str | None = None
    ) -> Manifest:
        body = {"preconditions": {"uid": uid}, "propagationPolicy": "Background"} if uid else None
        return await self.request("DELETE", resource_path(api_version, kind, namespace, name), body=body)


def _decode(text: str) -> Any:
    """An answer's JSON, or its text when it is not JSON (a proxy's error page)."""
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return text
