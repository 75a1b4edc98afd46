"""Routing decisions: which endpoint a request names, where it goes, whether it streams."""

from __future__ import annotations

from llm_operator.gateway.routing import (
    EndpointEntry,
    Route,
    RoutingTable,
    Target,
    build_table,
    pick,
    ready_addresses,
    resolve,
    wants_stream,
)

TABLE = RoutingTable({("ml", "falcon"): Route("ml", "falcon"), ("dev", "tiny"): Route("dev", "tiny")})


def test_path_prefix_routes_and_strips_the_prefix() -> None:
    assert resolve(TABLE, "gw.example.com", "/endpoints/ml/falcon/generate_stream") == Target(
        ("ml", "falcon"), "/generate_stream"
    )
    assert resolve(TABLE, None, "/endpoints/ml/falcon") == Target(("ml", "falcon"), "/")
    assert resolve(TABLE, None, "/endpoints/ml/falcon/v1/chat/completions") == Target(
        ("ml", "falcon"), "/v1/chat/completions"
    )


def test_host_routes_with_any_suffix_and_port() -> None:
    for host in ("falcon.ml", "falcon.ml:8080", "falcon.ml.svc.cluster.local", "FALCON.ML.example.com."):
        assert resolve(TABLE, host, "/generate") == Target(("ml", "falcon"), "/generate")


def test_path_wins_over_host() -> None:
    assert resolve(TABLE, "falcon.ml", "/endpoints/dev/tiny/info") == Target(("dev", "tiny"), "/info")


def test_unknown_endpoints_resolve_to_nothing() -> None:
    assert resolve(TABLE, "other.ml", "/generate") is None
    assert resolve(TABLE, "localhost:8080", "/metrics") is None
    assert resolve(TABLE, None, "/endpoints/ml/other/generate") is None
    assert resolve(TABLE, None, "/endpoints/ml") is None
    assert resolve(TABLE, "127.0.0.1:80", "/") is None


def test_custom_prefix() -> None:
    assert resolve(TABLE, None, "/ml/falcon/info", prefix="/") == Target(("ml", "falcon"), "/info")
    assert resolve(TABLE, None, "/llm/ml/falcon/info", prefix="llm") == Target(("ml", "falcon"), "/info")


def test_pick_prefers_least_in_flight_then_rotates() -> None:
    addresses = ("10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080")
    assert pick(addresses, {"10.0.0.1:8080": 2, "10.0.0.2:8080": 1, "10.0.0.3:8080": 2}, 0) == "10.0.0.2:8080"
    assert {pick(addresses, {}, turn) for turn in range(3)} == set(addresses)


def test_wants_stream() -> None:
    assert wants_stream("/generate_stream", {}, b"{}")
    assert wants_stream("/generate", {"accept": "text/event-stream"}, b"{}")
    assert wants_stream("/v1/chat/completions", {}, b'{"messages": [], "stream": true}')
    assert not wants_stream("/v1/chat/completions", {}, b'{"messages": [], "stream": false}')
    assert not wants_stream("/", {}, b'{"inputs": "say \\"stream\\""}')
    assert not wants_stream("/", {}, b'not json "stream"')
    assert not wants_stream("/generate", {}, b'{"stream": true}')


def _slice(endpoint: str, *items: dict[str, object], namespace: str = "ml") -> dict[str, object]:
    return {
        "metadata": {"namespace": namespace, "labels": {"llm-endpoints.io/endpoint": endpoint}},
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": list(items),
    }


def test_only_ready_non_terminating_addresses_count() -> None:
    body = _slice(
        "falcon",
        {"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": "a"}},
        {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
        {"addresses": ["10.0.0.3"], "conditions": {"ready": True, "terminating": True}},
        {"addresses": ["10.0.0.4"], "conditions": {}},
        {"addresses": ["fd00::5"], "conditions": {"ready": True}},
    )
    assert ready_addresses([body]) == {"10.0.0.1:8080": "a", "10.0.0.4:8080": "", "[fd00::5]:8080": ""}
    assert ready_addresses([{**body, "ports": [{"name": "metrics", "port": 9000}]}]) == {}


def test_build_table_joins_endpoints_slices_and_tokens() -> None:
    endpoints = {
        ("ml", "falcon"): EndpointEntry("protected", ("falcon-api-key", "token")),
        ("ml", "idle"): EndpointEntry(),
        ("ml", "paused"): EndpointEntry(paused=True),
    }
    slices = [
        _slice("falcon", {"addresses": ["10.0.0.1"], "conditions": {"ready": True}}),
        _slice("falcon", {"addresses": ["10.0.0.2"], "conditions": {"ready": True}}),
        _slice("falcon", {"addresses": ["10.9.9.9"], "conditions": {"ready": True}}, namespace="other"),
    ]
    table = build_table(endpoints, slices, {("ml", "falcon-api-key", "token"): "s3cret"})
    falcon = table.get(("ml", "falcon"))
    addresses = ("10.0.0.1:8080", "10.0.0.2:8080")
    pods = dict.fromkeys(addresses, "")
    assert falcon == Route(
        "ml", "falcon", "protected", ("falcon-api-key", "token"), "s3cret", addresses, pods
    )
    assert table.get(("ml", "idle")) == Route("ml", "idle")
    assert table.get(("ml", "paused")) == Route("ml", "paused", paused=True)
    assert table.get(("other", "falcon")) is None
