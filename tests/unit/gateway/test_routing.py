"""Routing decisions: which endpoint a request names, where it goes, whether it streams."""

from __future__ import annotations

import json

import pytest

from llm_operator.gateway.errors import BadRequest
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
        ("ml", "falcon"), "/generate_stream", "/generate_stream"
    )
    assert resolve(TABLE, None, "/endpoints/ml/falcon") == Target(("ml", "falcon"), "/", "/")
    assert resolve(TABLE, None, "/endpoints/ml/falcon/v1/chat/completions") == Target(
        ("ml", "falcon"), "/v1/chat/completions", "/v1/chat/completions"
    )


def test_host_routes_with_any_suffix_and_port() -> None:
    for host in ("falcon.ml", "falcon.ml:8080", "falcon.ml.svc.cluster.local", "FALCON.ML.example.com."):
        assert resolve(TABLE, host, "/generate") == Target(("ml", "falcon"), "/generate", "/generate")


def test_path_wins_over_host() -> None:
    assert resolve(TABLE, "falcon.ml", "/endpoints/dev/tiny/info") == Target(
        ("dev", "tiny"), "/info", "/info"
    )


def test_unknown_endpoints_resolve_to_nothing() -> None:
    assert resolve(TABLE, "other.ml", "/generate") is None
    assert resolve(TABLE, "localhost:8080", "/metrics") is None
    assert resolve(TABLE, None, "/endpoints/ml/other/generate") is None
    assert resolve(TABLE, None, "/endpoints/ml") is None
    assert resolve(TABLE, "127.0.0.1:80", "/") is None


def test_custom_prefix() -> None:
    assert resolve(TABLE, None, "/ml/falcon/info", prefix="/") == Target(("ml", "falcon"), "/info", "/info")
    info = Target(("ml", "falcon"), "/info", "/info")
    assert resolve(TABLE, None, "/llm/ml/falcon/info", prefix="llm") == info


def test_a_target_that_is_not_an_absolute_path_is_refused_for_host_and_path_routing() -> None:
    """`*@10.0.0.9:8080/generate` once turned the replica's address into userinfo (finding 1 of #10)."""
    for target in ("*@10.0.0.9:8080/generate", "http://10.0.0.9/generate", "*", "generate", ""):
        for host in ("falcon.ml", None):
            with pytest.raises(BadRequest) as caught:
                resolve(TABLE, host, target)
            assert (caught.value.status, caught.value.error_type) == (400, "validation")


def test_the_raw_path_is_what_is_forwarded() -> None:
    """Decoded for the split, raw for the upstream: `%252e` and `%2F` arrive as sent (finding 2 of #10)."""
    raw = "/endpoints/ml/falcon/x/%252e%252e/metrics"
    decoded = "/endpoints/ml/falcon/x/%2e%2e/metrics"
    assert resolve(TABLE, None, decoded, raw_path=raw) == Target(
        ("ml", "falcon"), "/x/%2e%2e/metrics", "/x/%252e%252e/metrics"
    )
    assert resolve(TABLE, "falcon.ml", "/a/b", raw_path="/a%2Fb") == Target(
        ("ml", "falcon"), "/a/b", "/a%2Fb"
    )


def test_percent_encoded_endpoint_segments_are_refused() -> None:
    """Decoded and raw routing would disagree: the decoded path names an endpoint the raw one does not."""
    for raw in (
        "/endpoints/ml%2Ffalcon/generate",
        "/endpoints/m%6C/falcon/generate",
        "/%65ndpoints/ml/falcon/generate",
        "/endpoints/ml/falcon%2Fgenerate",
    ):
        with pytest.raises(BadRequest):
            resolve(TABLE, None, "/endpoints/ml/falcon/generate", raw_path=raw)


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


def test_json_nested_past_the_parser_is_a_bad_request() -> None:
    """It raised RecursionError, which escaped the request's handling (finding 3 of #10)."""
    deep = b'{"stream": true, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(BadRequest):
        wants_stream("/", {}, deep)
    assert wants_stream("/", {}, json.dumps({"stream": True, "x": [[[]]]}).encode())


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
        ("ml", "falcon"): EndpointEntry("protected", "sha256:uid:" + "0" * 64),
        ("ml", "idle"): EndpointEntry(),
        ("ml", "paused"): EndpointEntry(paused=True),
    }
    slices = [
        _slice("falcon", {"addresses": ["10.0.0.1"], "conditions": {"ready": True}}),
        _slice("falcon", {"addresses": ["10.0.0.2"], "conditions": {"ready": True}}),
        _slice("falcon", {"addresses": ["10.9.9.9"], "conditions": {"ready": True}}, namespace="other"),
    ]
    table = build_table(endpoints, slices)
    falcon = table.get(("ml", "falcon"))
    addresses = ("10.0.0.1:8080", "10.0.0.2:8080")
    pods = dict.fromkeys(addresses, "")
    assert falcon == Route("ml", "falcon", "protected", "sha256:uid:" + "0" * 64, addresses, pods)
    assert table.get(("ml", "idle")) == Route("ml", "idle")
    assert table.get(("ml", "paused")) == Route("ml", "paused", paused=True)
    assert table.get(("other", "falcon")) is None
