"""CORS as TGI's router answers it by default (tower-http's `CorsLayer`, any origin, GET and POST, the
`content-type` request header): every answer carries `access-control-allow-origin: *` and `vary` on the
preflight headers; any OPTIONS request is a preflight, answered here (200, empty) before routing and the key
check. Browsers still cannot send a bearer token cross-origin: `authorization` is not an allowed header."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

EVERY_ANSWER = [
    (b"vary", b"origin, access-control-request-method, access-control-request-headers"),
    (b"access-control-allow-origin", b"*"),
]
PREFLIGHT = [
    (b"access-control-allow-methods", b"GET,POST"),
    (b"access-control-allow-headers", b"content-type"),
    (b"content-length", b"0"),
]


class TgiCors:
    """ASGI middleware: the CORS headers of TGI's router."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 200, "headers": EVERY_ANSWER + PREFLIGHT})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *EVERY_ANSWER]}
            await send(message)

        await self.app(scope, receive, send_with_cors)
