"""The gateway's Kubernetes I/O: watch LLMEndpoints and EndpointSlices, ask the operator to wake an endpoint,
read woken pods.

All decisions are in `routing.build_table`; this module only keeps the latest objects (listed and watched by
`kube.watch.follow`) and hands a fresh table to the gateway after every change. The gateway reads no Secret:
a protected endpoint's key is checked against the salted hash the operator publishes in its status
(`status.apiKeyHash`).

Wake: the gateway sets the endpoint's `status.wakeRequestedAt` (a merge patch of the status subresource,
as its own field manager); the operator, on that event, scales the endpoint's Deployment from 0 to 1, and
its autoscaler then counts the held requests as in-flight load. The gateway writes no Deployment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from llm_operator.api.v1alpha1 import API_VERSION, KIND, LLMEndpointStatus, parse_endpoint
from llm_operator.contract import ENDPOINT_LABEL, GATEWAY_FIELD_MANAGER
from llm_operator.errors import InvalidEndpointError, OperatorError
from llm_operator.gateway.routing import EndpointEntry, RoutingTable, build_table
from llm_operator.kube import Credentials, Kube, resource_path
from llm_operator.kube.watch import follow
from llm_operator.objects import Key, Manifest

log = logging.getLogger("llm_operator.gateway.watch")
SLICES_API = "discovery.k8s.io/v1"


def endpoint_entry(body: Manifest) -> EndpointEntry | None:
    """What the gateway needs of a stored LLMEndpoint, or None when it does not parse."""
    try:
        endpoint = parse_endpoint(body)
    except InvalidEndpointError as error:
        log.warning("ignored: %s", error)
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
            field_manager=GATEWAY_FIELD_MANAGER,
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
        self._listed: set[tuple[str, str | None]] = set()

    def _publish(self) -> None:
        if len(self._listed) == 2 * len(self.scopes):  # both kinds listed in every scope
            self.publish(build_table(self.endpoints, self.slices.values()))
            self.synced.set()

    async def run(self) -> None:
        """Watch both kinds in every scope, until cancelled (a connection for each watch, its own client)."""
        slices = {"labelSelector": ENDPOINT_LABEL}
        async with Kube(self.credentials, connections=2 * len(self.scopes)) as kube:
            await asyncio.gather(
                *(self._follow(kube, API_VERSION, KIND, ns, {}) for ns in self.scopes),
                *(self._follow(kube, SLICES_API, "EndpointSlice", ns, slices) for ns in self.scopes),
            )

    async def _follow(
        self, kube: Kube, api_version: str, kind: str, namespace: str | None, params: dict[str, str]
    ) -> None:
        held: dict[Key, Any] = self.endpoints if kind == KIND else self.slices
        apply = self._on_endpoint if kind == KIND else self._on_slice

        def on_list(items: list[Manifest]) -> None:
            """A fresh list of one scope replaces what that scope held before."""
            for key in [k for k in held if namespace is None or k[0] == namespace]:
                del held[key]
            for item in items:
                apply("ADDED", item)
            self._listed.add((kind, namespace))
            self._publish()

        def on_event(change: str, body: Manifest) -> None:
            apply(change, body)
            self._publish()

        path = resource_path(api_version, kind, namespace)
        await follow(kube, path, params, on_list=on_list, on_event=on_event)

    def _on_endpoint(self, change: str, body: Manifest) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        entry = endpoint_entry(body) if change != "DELETED" else None
        if entry is None:
            self.endpoints.pop(key, None)
        else:
            self.endpoints[key] = entry

    def _on_slice(self, change: str, body: Manifest) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if change == "DELETED":
            self.slices.pop(key, None)
        else:
            self.slices[key] = body
