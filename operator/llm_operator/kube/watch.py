"""List one collection, then watch it from the list's resourceVersion, until cancelled.

The decisions are pure (`watch_query`, `read_event`, `relist_delay`); `follow` makes the requests. A watch
that ends (its `timeoutSeconds`) continues from the last resourceVersion seen, bookmarks included. 410 Gone
(the version is too old) lists again at once. Any other failure is logged and backed off before listing
again: a transient one (unreachable, 429, 5xx) by RETRY_SECONDS, a refusal (401, 403, 404, ...) exponentially
up to MAX_BACKOFF_SECONDS, since it lasts until someone fixes the RBAC, the CRD or the credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from llm_operator.errors import OperatorError
from llm_operator.kube.client import Kube
from llm_operator.kube.errors import TRANSIENT, GoneError, api_error
from llm_operator.objects import Manifest

log = logging.getLogger("llm_operator.kube.watch")

WATCH_SECONDS = 300
"""The server ends each watch request after this long; the next continues where it stopped."""
RETRY_SECONDS = 2.0
MAX_BACKOFF_SECONDS = 60.0
CHANGES = ("ADDED", "MODIFIED", "DELETED")


@dataclass(frozen=True)
class WatchEvent:
    """One line of a watch: a change (ADDED, MODIFIED, DELETED) or a BOOKMARK."""

    type: str
    object: Manifest
    resource_version: str | None


def watch_query(params: Mapping[str, str], version: str, seconds: int = WATCH_SECONDS) -> dict[str, str]:
    """The query of a watch request continuing from `version`, with bookmarks."""
    return {
        **params,
        "watch": "1",
        "resourceVersion": version,
        "allowWatchBookmarks": "true",
        "timeoutSeconds": str(seconds),
    }


def read_event(event: Manifest, what: str) -> WatchEvent:
    """A decoded watch line; an ERROR event (its object is a `Status`) raises that Status's typed error."""
    body = event.get("object") or {}
    if event.get("type") == "ERROR":
        raise api_error(int(body.get("code") or 0), body, what)
    version = (body.get("metadata") or {}).get("resourceVersion")
    return WatchEvent(str(event.get("type")), body, version)


def relist_delay(error: OperatorError, failures: int) -> float:
    """Seconds to wait before listing again after `error`, the `failures`-th failure in a row."""
    if isinstance(error, GoneError):
        return 0.0
    if isinstance(error, TRANSIENT):
        return RETRY_SECONDS
    return min(RETRY_SECONDS * 2.0 ** (max(failures, 1) - 1), MAX_BACKOFF_SECONDS)


async def follow(
    kube: Kube,
    path: str,
    params: Mapping[str, str],
    *,
    on_list: Callable[[list[Manifest]], None],
    on_event: Callable[[str, Manifest], None],
) -> None:
    """Keep a collection's callers current: `on_list(items)` after every list (it replaces what they
    held), then `on_event(type, object)` for each change. Runs until cancelled."""
    failures = 0
    while True:
        try:
            listed = await kube.request("GET", path, params=dict(params))
            on_list(listed.get("items") or [])
            failures = 0
            version: str = listed["metadata"]["resourceVersion"]
            while True:
                version = await _watch_once(kube, path, params, version, on_event)
        except OperatorError as error:
            if isinstance(error, GoneError):
                log.debug("watch %s expired, listing again", path)
            else:
                failures += 1
            delay = relist_delay(error, failures)
            if delay:
                log.warning("watch %s failed, listing again in %.0f s: %s", path, delay, error)
            await asyncio.sleep(delay)


async def _watch_once(
    kube: Kube,
    path: str,
    params: Mapping[str, str],
    version: str,
    on_event: Callable[[str, Manifest], None],
) -> str:
    """One watch request; the resourceVersion to continue from when the server ends it."""
    events = kube.stream(path, watch_query(params, version), read_timeout=WATCH_SECONDS + 30)
    async with contextlib.aclosing(events):
        async for line in events:
            event = read_event(line, f"WATCH {path}")
            version = event.resource_version or version
            if event.type in CHANGES:
                on_event(event.type, event.object)
    return version
