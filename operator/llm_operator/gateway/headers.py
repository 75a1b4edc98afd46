"""Header rules, pure: what goes upstream with a request, what comes back with an answer, which addresses
proxy headers name, and the headers of the gateway's own answers.

Request headers are a mapping with lower-case names (Starlette's `Headers`: `get` gives a name's first value,
`items` every pair).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

TIMEOUT_HEADER = "x-scale-up-timeout"
"""How long a client lets its request be held (see `hold.hold_timeout`); not sent upstream."""
FORWARDED_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
"""Headers a proxy in front of the gateway adds: their presence means the request came through one."""
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
"""Request headers of one connection (RFC 9110 7.6.1), plus Host and Content-Length, which the client
connection to the replica sets."""
RESPONSE_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"trailer", b"transfer-encoding", b"upgrade", b"te"}
)
"""Answer headers of one connection: the server in front of the client sets its own."""
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
"""Headers of an SSE answer the gateway starts itself, while a stream request is held."""

RawHeaders = list[tuple[bytes, bytes]]


def upstream(headers: Mapping[str, str], peer: str | None, scheme: str) -> dict[str, str]:
    """The headers sent to the replica: the client's less hop-by-hop ones and X-Scale-Up-Timeout, `peer`
    appended to X-Forwarded-For, X-Forwarded-Host and -Proto set unless the client sent them.

    Authorization goes as sent: a protected endpoint's pods check the same bearer token."""
    out = {k: v for k, v in headers.items() if k not in HOP_BY_HOP and k != TIMEOUT_HEADER}
    if peer is not None:
        prior = headers.get("x-forwarded-for")
        out["x-forwarded-for"] = f"{prior}, {peer}" if prior else peer
    out.setdefault("x-forwarded-host", headers.get("host", ""))
    out.setdefault("x-forwarded-proto", scheme)
    return out


def downstream(raw: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """A replica's answer headers as relayed to the client: names lower-cased, hop-by-hop ones left out."""
    return [(k.lower(), v) for k, v in raw if k.lower() not in RESPONSE_HOP_BY_HOP]


def own(content_type: bytes, length: int, extra: Mapping[str, str] | None = None) -> RawHeaders:
    """The headers of a whole answer of the gateway's own: type, length, then `extra` in order."""
    raw = [(b"content-type", content_type), (b"content-length", str(length).encode())]
    return raw + [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]


def forwarded_for(headers: Mapping[str, str]) -> list[str] | None:
    """Client addresses named by proxy headers, or None when no proxy header is present."""
    present = [name for name in FORWARDED_HEADERS if name in headers]
    if not present:
        return None
    found: list[str] = []
    for part in headers.get("forwarded", "").split(","):
        for pair in part.split(";"):
            key, _, value = pair.strip().partition("=")
            if key.lower() == "for" and value:
                host = value.strip('"')
                found.append(host.split("]")[0] + "]" if host.startswith("[") else host.split(":")[0])
    found += [a.strip() for a in headers.get("x-forwarded-for", "").split(",") if a.strip()]
    if real := headers.get("x-real-ip", "").strip():
        found.append(real)
    return found
