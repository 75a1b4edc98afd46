"""Header rules: what goes upstream with a request, what comes back, which addresses proxy headers name."""

from __future__ import annotations

from starlette.datastructures import Headers

from llm_operator.gateway import headers
from llm_operator.gateway.headers import forwarded_for


def test_upstream_drops_hop_by_hop_and_the_hold_header_and_keeps_the_rest() -> None:
    sent = Headers(
        raw=[
            (b"host", b"gw.example"),
            (b"connection", b"keep-alive, x-thing"),
            (b"content-length", b"12"),
            (b"transfer-encoding", b"chunked"),
            (b"x-scale-up-timeout", b"30"),
            (b"authorization", b"Bearer s3cret"),
            (b"content-type", b"application/json"),
        ]
    )
    out = headers.upstream(sent, "10.0.0.9", "https")
    assert out == {
        "authorization": "Bearer s3cret",  # a protected endpoint's pods check the same token
        "content-type": "application/json",
        "x-forwarded-for": "10.0.0.9",
        "x-forwarded-host": "gw.example",
        "x-forwarded-proto": "https",
    }


def test_upstream_appends_the_peer_to_forwarded_for_and_keeps_a_proxy_s_host_and_proto() -> None:
    sent = {
        "host": "gw.internal",
        "x-forwarded-for": "203.0.113.9",
        "x-forwarded-host": "api.example",
        "x-forwarded-proto": "https",
    }
    out = headers.upstream(sent, "10.0.0.9", "http")
    assert out["x-forwarded-for"] == "203.0.113.9, 10.0.0.9"
    assert (out["x-forwarded-host"], out["x-forwarded-proto"]) == ("api.example", "https")
    assert headers.upstream({"x-forwarded-for": "203.0.113.9"}, None, "http")["x-forwarded-for"] == (
        "203.0.113.9"
    )  # no peer known: nothing to append
    assert "x-forwarded-for" not in headers.upstream({}, None, "http")


def test_downstream_lower_cases_names_and_drops_hop_by_hop_ones() -> None:
    raw = [
        (b"Content-Type", b"text/event-stream"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"close"),
        (b"X-Request-Id", b"abc"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    assert headers.downstream(raw) == [
        (b"content-type", b"text/event-stream"),
        (b"x-request-id", b"abc"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


def test_own_answers_carry_type_length_then_the_refusal_s_headers_in_order() -> None:
    assert headers.own(b"application/json", 17, {"Connection": "close", "retry-after": "1"}) == [
        (b"content-type", b"application/json"),
        (b"content-length", b"17"),
        (b"connection", b"close"),
        (b"retry-after", b"1"),
    ]
    assert headers.own(b"text/plain", 0) == [(b"content-type", b"text/plain"), (b"content-length", b"0")]


def test_forwarded_for_parses_every_header() -> None:
    headers = {
        "forwarded": 'for=192.0.2.60;proto=http, for="[2001:db8::7]:4711"',
        "x-forwarded-for": "10.0.0.1",
    }
    assert forwarded_for(headers) == ["192.0.2.60", "[2001:db8::7]", "10.0.0.1"]
    assert forwarded_for({}) is None
