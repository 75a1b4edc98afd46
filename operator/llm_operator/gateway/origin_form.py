"""Request targets as the gateway sees them: uvicorn's httptools protocol, except that a target that is not
origin-form (`/path?query`, RFC 9112 3.2.1) reaches the app whole, as `raw_path` and `path`.

uvicorn keeps only the path of an absolute-form target (`http://host/path`), so the app could not tell it
from `/path`; passed whole, the app refuses it (400) as it refuses `*@host:port/path` and any target that
does not start with `/` (`proxy.request_target`).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class OriginFormTarget(HttpToolsProtocol):
    """Pass as uvicorn's `http=` (or subclass)."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if not self.url.startswith(b"/") and "raw_path" in self.scope:
            self.scope["raw_path"] = self.url
            self.scope["path"] = self.url.decode("latin-1")
