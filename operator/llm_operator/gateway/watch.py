"""The gateway's Kubernetes I/O: watch LLMEndpoints and EndpointSlices, ask the operator to wake an endpoint,
read woken pods.

All decisions are in `routing.build_table`; this module only keeps the latest objects and hands a fresh table
to the gateway after every change. The gateway reads no Secret: a protected endpoint's key is checked
against the salted hash the operator publishes in its status (`status.apiKeyHash`).

Wake: the gateway sets the endpoint's `status.wakeRequestedAt` (a merge patch of the status subresource,
as its own field manager); the operator, on that event, scales the endpoint's Deployment from 0 to 1, and
its autoscaler then counts the held requests as in-flight load. The gateway writes no Deployment.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pydantic

from llm_operator.api.v1alpha1 import API_VERSION, KIND, LLMEndpoint, LLMEndpointStatus
from llm_operator.errors import OperatorError
from llm_operator.gateway.routing import EndpointEntry, Key, RoutingTable, build_table
from llm_operator.kube import Credentials, Kube, resource_path
from llm_operator.settings import ENDPOINT_LABEL

Manifest = dict[str, Any]
log = logging.getLogger("llm_operator.gateway.watch")
SLICES = ("discovery.k8s.io/v1", "endpointslices")
WATCH_SECONDS = 300
RETRY_SECONDS = 2.0
FIELD_MANAGER = "llm-gateway"
"""The gateway's field manager: it owns `status.wakeRequestedAt` and nothing else."""


def endpoint_entry(body: Manifest) -> EndpointEntry | None:
    """What the gateway needs of a stored LLMEndpoint, or None when it does not parse."""
    try:
        endpoint = LLMEndpoint.model_validate(body)
    except pydantic.ValidationError as error:
        log.warning("ignoring LLMEndpoint that does not parse: %s", error)
        return None
    protected = endpoint.spec.access == "protected"
    key_hash = endpoint.status.api_key_hash if protected else None
    return EndpointEntry(endpoint.spec.access, key_hash, endpoint.spec.paused)


def wake_patch(now: datetime) -> Manifest:
    """The status merge patch that asks the operator to wake an endpoint."""
    stamp = LLMEndpointStatus(wake_requested_at=now)
    return {"status": stamp.model_dump(by_alias=True, mode="json", include={"wake_requested_at"})}


class StatusWaker:
    """Ask the operator for one replica of an endpoint that has none ready."""

    def __init__(self, kube: Kube, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.kube, self.clock = kube, clock

    async def __call__(self, key: Key) -> None:
        namespace, name = key
        await self.kube.merge_patch(
            API_VERSION,
            KIND,
            namespace,
            name,
            wake_patch(self.clock()),
            subresource="status",
            field_manager=FIELD_MANAGER,
        )


class PodReader:
    """Read one pod (the woken replica, for the cold-start breakdown); None when that fails."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    async def __call__(self, namespace: str, name: str) -> Manifest | None:
        try:
            return await self.kube.get("v1", "Pod", namespace, name)
        except OperatorError as error:
            log.warning("cannot read pod %s/%s for the cold-start breakdown: %s", namespace, name, error)
            return None


class ClusterWatcher:
    """Keeps `publish(table)` fed with the routing table the cluster describes."""

    def __init__(
        self,
        credentials: Credentials,
        publish: Callable[[RoutingTable], None],
        *,
        namespaces: Sequence[str] = (),
    ) -> None:
        self.credentials, self.publish = credentials, publish
        self.scopes: tuple[str | None, ...] = tuple(namespaces) or (None,)
        """Namespaces watched, each on its own; (None,) watches the whole cluster."""
        self.endpoints: dict[Key, EndpointEntry] = {}
        self.slices: dict[Key, Manifest] = {}
        self.synced = asyncio.Event()
        self._listed: set[str] = set()

    def _publish(self) -> None:
        if len(self._listed) == 2 * len(self.scopes):  # both kinds listed in every scope
            self.publish(build_table(self.endpoints, self.slices.values()))
            self.synced.set()

    async def run(self) -> None:
        """Watch both kinds, until cancelled."""
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=WATCH_SECONDS + 30)
        connector = aiohttp.TCPConnector(ssl=self.credentials.ssl_context())
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=2**22) as session:
            slices = {"labelSelector": ENDPOINT_LABEL}
            await asyncio.gather(
                *(
                    self._watch(session, resource_path(API_VERSION, KIND, ns), {}, self._on_endpoint)
                    for ns in self.scopes
                ),
                *(self._watch(session, self._slices_path(ns), slices, self._on_slice) for ns in self.scopes),
            )

    @staticmethod
    def _slices_path(namespace: str | None) -> str:
        api, plural = SLICES
        scope = f"/namespaces/{namespace}" if namespace else ""
        return f"/apis/{api}{scope}/{plural}"

    async def _on_endpoint(self, kind: str, body: Manifest) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        entry = endpoint_entry(body) if kind != "DELETED" else None
        if entry is None:
            self.endpoints.pop(key, None)
        else:
            self.endpoints[key] = entry

    async def _on_slice(self, kind: str, body: Manifest) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if kind == "DELETED":
            self.slices.pop(key, None)
        else:
            self.slices[key] = body

    async def _watch(
        self,
        session: aiohttp.ClientSession,
        path: str,
        params: dict[str, str],
        handle: Callable[[str, Manifest], Awaitable[None]],
    ) -> None:
        """List, then watch from the list's resourceVersion; list again when the watch expires or fails."""
        while True:
            try:
                listed = await self._get(session, path, params)
                await self._replace_all(handle, listed.get("items") or [], path)
                self._listed.add(path)
                self._publish()
                version = listed["metadata"]["resourceVersion"]
                while version:
                    version = await self._stream(session, path, params, version, handle)
            except (aiohttp.ClientError, TimeoutError, OperatorError, json.JSONDecodeError) as error:
                log.warning("watch %s failed, listing again: %r", path, error)
                await asyncio.sleep(RETRY_SECONDS)

    async def _replace_all(
        self, handle: Callable[[str, Manifest], Awaitable[None]], items: list[Manifest], path: str
    ) -> None:
        """A fresh list of one scope replaces what that scope held before."""
        namespace = path.split("/namespaces/")[1].split("/")[0] if "/namespaces/" in path else None
        held = self.slices if path.endswith("/endpointslices") else self.endpoints
        for key in [k for k in held if namespace is None or k[0] == namespace]:
            del held[key]
        for item in items:
            await handle("ADDED", item)

    def _headers(self) -> dict[str, str]:
        token = self.credentials.bearer()
        return {"Accept": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}

    async def _get(self, session: aiohttp.ClientSession, path: str, params: dict[str, str]) -> Manifest:
        async with session.get(
            self.credentials.server + path, params=params, headers=self._headers()
        ) as answer:
            body: Manifest = await answer.json(content_type=None)
            if answer.status >= 400:
                raise OperatorError(f"GET {path}: HTTP {answer.status}: {body.get('message', '')}")
            return body

    async def _stream(
        self,
        session: aiohttp.ClientSession,
        path: str,
        params: dict[str, str],
        version: str,
        handle: Callable[[str, Manifest], Awaitable[None]],
    ) -> str | None:
        """One watch request; the resourceVersion to continue from, or None to list again."""
        query = {
            **params,
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        async with session.get(
            self.credentials.server + path, params=query, headers=self._headers()
        ) as answer:
            if answer.status >= 400:
                return None
            async for line in answer.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, body = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    return None  # 410 Gone: the version is too old
                version = body.get("metadata", {}).get("resourceVersion") or version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    await handle(kind, body)
                    self._publish()
        return version
