"""The gateway's routing table and its decisions: which endpoint a request is for, and where it goes. Pure.

A request names its endpoint either by path, `<prefix>/<namespace>/<name>/<rest>` (Ingress, the URL in an
endpoint's status), or by Host, `<name>.<namespace>[.svc[.cluster.local]][:port]` (a wildcard DNS name
pointing at the gateway, or a client that sets Host). The path wins when both could apply.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from llm_operator.contract import ENDPOINT_LABEL, ENDPOINTS_PATH
from llm_operator.gateway.errors import BadRequest
from llm_operator.objects import Key

Access = Literal["public", "protected", "private"]

STREAM_PATHS = frozenset({"/generate_stream"})
"""Routes that always answer with SSE."""
MAYBE_STREAM_PATHS = frozenset({"/", "/v1/chat/completions", "/v1/completions", "/invocations"})
"""Routes that stream when the JSON body says `"stream": true`."""


class EndpointEntry(NamedTuple):
    """What the gateway keeps of one LLMEndpoint's spec."""

    access: Access = "public"
    api_key_hash: str | None = None
    """A protected endpoint's `status.apiKeyHash` (see `llm_operator.apikey`)."""
    paused: bool = False


@dataclass(frozen=True)
class Route:
    """What the gateway knows about one endpoint."""

    namespace: str
    name: str
    access: Access = "public"
    api_key_hash: str | None = None
    """The salted hash of a protected endpoint's key, from its status; None until the operator publishes it
    (protected endpoints then refuse all)."""
    addresses: tuple[str, ...] = ()
    """`host:port` of every ready, non-terminating serving pod."""
    pods: Mapping[str, str] = field(default_factory=dict)
    """Pod name behind each address (from the EndpointSlice's targetRef), where known."""
    paused: bool = False
    """`spec.paused`: requests are refused, not held, and never wake it."""

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class RoutingTable:
    """Every known endpoint by (namespace, name); updated by returning new tables."""

    routes: Mapping[Key, Route] = field(default_factory=dict)

    def get(self, key: Key) -> Route | None:
        return self.routes.get(key)

    def with_route(self, route: Route) -> RoutingTable:
        return RoutingTable({**self.routes, route.key: route})


@dataclass(frozen=True)
class Target:
    """The endpoint a request is for and the path to ask its server for: `path` decoded (for decisions),
    `raw_path` as the client sent it (what is forwarded)."""

    key: Key
    path: str
    raw_path: str


def _split_path(path: str, prefix: str) -> tuple[Key, str] | None:
    """(namespace, name) and the rest of `<prefix>/<namespace>/<name>/<rest>`."""
    base = f"/{prefix.strip('/')}/" if prefix.strip("/") else "/"
    if not path.startswith(base):
        return None
    parts = path[len(base) :].split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        return None
    return (parts[0], parts[1]), ("/" + parts[2] if len(parts) == 3 else "/")


def _host_key(host: str) -> Key | None:
    name_part = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    labels = name_part.lower().rstrip(".").split(".")
    if len(labels) < 2 or not labels[0] or not labels[1]:
        return None
    return (labels[1], labels[0])


def resolve(
    table: RoutingTable,
    host: str | None,
    path: str,
    raw_path: str | None = None,
    prefix: str = ENDPOINTS_PATH,
) -> Target | None:
    """The endpoint `host` and `path` name, if the table knows it. `path` is the decoded path, `raw_path`
    the one received (the same when omitted).

    Raises BadRequest for a target that is not an absolute path (it would let the client choose the
    upstream), and for a path whose endpoint segments are percent-encoded (`/endpoints/ml%2Ffalcon/...`):
    decoded and raw routing must agree, since the raw path is what is forwarded.
    """
    raw = path if raw_path is None else raw_path
    if not raw.startswith("/") or not path.startswith("/"):
        raise BadRequest(f"the request target must be an absolute path starting with '/', got {raw[:100]!r}")
    if (by_path := _split_path(path, prefix)) is not None and by_path[0] in table.routes:
        by_raw = _split_path(raw, prefix)
        if by_raw is None or by_raw[0] != by_path[0]:
            raise BadRequest(f"the endpoint's part of the path must not be percent-encoded: {raw[:100]!r}")
        return Target(by_path[0], by_path[1], by_raw[1])
    if host and (key := _host_key(host)) and key in table.routes:
        return Target(key, path, raw)
    return None


def pick(addresses: tuple[str, ...], in_flight: Mapping[str, int], turn: int) -> str:
    """Least in-flight requests (from this gateway's view) wins; ties go round-robin by `turn`."""
    fewest = min(in_flight.get(a, 0) for a in addresses)
    candidates = [a for a in addresses if in_flight.get(a, 0) == fewest]
    return candidates[turn % len(candidates)]


def wants_stream(path: str, headers: Mapping[str, str], body: bytes) -> bool:
    """Whether the request asks for an SSE answer (decides how a held request waits).

    A body that is not JSON is not a stream request (the replica answers its error); valid JSON nested
    deeper than the parser can follow raises BadRequest (400)."""
    if path in STREAM_PATHS or "text/event-stream" in headers.get("accept", ""):
        return True
    if path not in MAYBE_STREAM_PATHS or b'"stream"' not in body:
        return False
    try:
        decoded = json.loads(body)
    except ValueError:
        return False
    except RecursionError:
        raise BadRequest("the request body's JSON is nested too deeply") from None
    return isinstance(decoded, dict) and decoded.get("stream") is True


def ready_addresses(slices: Iterable[Mapping[str, Any]], port_name: str = "http") -> dict[str, str]:
    """`host:port` -> pod name ("" when the slice names none) of a Service's ready, non-terminating
    endpoints, from its EndpointSlices."""
    found: dict[str, str] = {}
    for body in slices:
        port = next((p.get("port") for p in body.get("ports") or () if p.get("name") == port_name), None)
        if port is None:
            continue
        for item in body.get("endpoints") or ():
            conditions = item.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            ref = item.get("targetRef") or {}
            pod = ref.get("name", "") if ref.get("kind") == "Pod" else ""
            for address in item.get("addresses") or ():
                host = f"[{address}]" if ":" in address else address
                found[f"{host}:{port}"] = pod
    return dict(sorted(found.items()))


def build_table(
    endpoints: Mapping[Key, EndpointEntry],
    slices: Iterable[Mapping[str, Any]],
    port_name: str = "http",
) -> RoutingTable:
    """The table from each endpoint's entry and its Services' EndpointSlices (labelled with its name)."""
    by_endpoint: dict[Key, list[Mapping[str, Any]]] = {}
    for body in slices:
        meta = body.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(ENDPOINT_LABEL)
        if owner:
            by_endpoint.setdefault((meta.get("namespace", ""), owner), []).append(body)
    routes: dict[Key, Route] = {}
    for (namespace, name), (access, key_hash, paused) in endpoints.items():
        pods = ready_addresses(by_endpoint.get((namespace, name), ()), port_name)
        routes[(namespace, name)] = Route(namespace, name, access, key_hash, tuple(pods), pods, paused)
    return RoutingTable(routes)
