"""`/status`: the loading phase and progress, from the process's first second, without the API key."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llm_serving.http.state import AppState


async def status(request: Request) -> Response:
    """The `LoadStatus` now, as JSON (200 in every phase, `Failed` included)."""
    state: AppState = request.app.state.serving
    return JSONResponse(state.progress.snapshot().to_json())
