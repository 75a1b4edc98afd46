"""List then watch: the query, what each watch line means, when to list again, and `follow` against a
stand-in API server on loopback (aiohttp.web) that lists, streams, expires a version and refuses a watch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from llm_operator.errors import OperatorError
from llm_operator.kube import (
    APIUnavailableError,
    Credentials,
    ForbiddenError,
    GoneError,
    Kube,
    NotFoundError,
    ServerBusyError,
    UnauthorizedError,
)
from llm_operator.kube.watch import (
    MAX_BACKOFF_SECONDS,
    RETRY_SECONDS,
    WATCH_SECONDS,
    follow,
    read_event,
    relist_delay,
    watch_query,
)
from llm_operator.objects import Manifest


def pod(name: str, version: str) -> Manifest:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "ml", "resourceVersion": version}}


def test_a_watch_continues_from_a_version_with_bookmarks() -> None:
    assert watch_query({"labelSelector": "a=b"}, "42") == {
        "labelSelector": "a=b",
        "watch": "1",
        "resourceVersion": "42",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": str(WATCH_SECONDS),
    }


def test_changes_and_bookmarks_carry_their_version() -> None:
    change = read_event({"type": "MODIFIED", "object": pod("a", "7")}, "WATCH /x")
    assert (change.type, change.object["metadata"]["name"], change.resource_version) == ("MODIFIED", "a", "7")
    bookmark = read_event({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}, "WATCH /x")
    assert (bookmark.type, bookmark.resource_version) == ("BOOKMARK", "9")
    assert read_event({"type": "ADDED", "object": {}}, "WATCH /x").resource_version is None


def test_an_error_event_raises_its_status() -> None:
    expired = {"type": "ERROR", "object": {"code": 410, "reason": "Expired", "message": "too old"}}
    with pytest.raises(GoneError, match="too old"):
        read_event(expired, "WATCH /x")
    refused = {"type": "ERROR", "object": {"code": 403, "reason": "Forbidden", "message": "no"}}
    with pytest.raises(ForbiddenError):
        read_event(refused, "WATCH /x")


def test_an_expired_version_lists_again_at_once() -> None:
    assert relist_delay(GoneError(410, {}, "x"), 1) == 0.0
    assert relist_delay(GoneError(410, {}, "x"), 9) == 0.0


def test_transient_failures_retry_after_a_short_pause() -> None:
    for error in (APIUnavailableError("down"), ServerBusyError(503, {}, "x"), ServerBusyError(429, {}, "x")):
        assert [relist_delay(error, n) for n in (1, 5, 20)] == [RETRY_SECONDS] * 3


@pytest.mark.parametrize(
    "error",
    [ForbiddenError(403, {}, "x"), NotFoundError(404, {}, "x"), UnauthorizedError(401, {}, "x")],
)
def test_refusals_back_off_exponentially_to_a_cap(error: OperatorError) -> None:
    delays = [relist_delay(error, n) for n in range(1, 12)]
    assert delays[:3] == [RETRY_SECONDS, 2 * RETRY_SECONDS, 4 * RETRY_SECONDS]
    assert delays == sorted(delays)
    assert delays[-1] == MAX_BACKOFF_SECONDS


class StandIn:
    """An API server for one collection: scripted answers to lists and watches, and the requests seen."""

    def __init__(self, watches: list[tuple[int, list[Manifest]]]) -> None:
        self.watches = watches
        """Each watch request's (status, events), in order; past the end a watch hangs."""
        self.seen: list[tuple[str, str | None]] = []
        self.lists = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "1":
            self.lists += 1
            self.seen.append(("list", None))
            items = [pod("a", "1")] if self.lists == 1 else [pod("b", "20")]
            return web.json_response({"items": items, "metadata": {"resourceVersion": str(self.lists * 10)}})
        self.seen.append(("watch", request.query["resourceVersion"]))
        assert request.query["allowWatchBookmarks"] == "true"
        if not self.watches:
            await asyncio.sleep(3600)
        code, events = self.watches.pop(0)
        if code != 200:
            body = {"kind": "Status", "code": code, "reason": "Forbidden", "message": "cannot watch pods"}
            return web.json_response(body, status=code)
        response = web.StreamResponse()
        await response.prepare(request)
        for event in events:
            await response.write(json.dumps(event).encode() + b"\n\n")
        return response


@contextlib.asynccontextmanager
async def serving(stand_in: StandIn) -> AsyncIterator[Kube]:
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ml/pods", stand_in.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with Kube(Credentials(server=f"http://127.0.0.1:{port}")) as kube:
            yield kube
    finally:
        await runner.cleanup()


async def test_follow_lists_watches_and_lists_again_when_the_version_expires(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stand_in = StandIn(
        [
            (200, [{"type": "MODIFIED", "object": pod("a", "11")},
                   {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}}]),
            (200, [{"type": "ERROR", "object": {"code": 410, "reason": "Expired", "message": "too old"}}]),
            (403, []),
        ]
    )  # fmt: skip
    lists: list[list[str]] = []
    events: list[tuple[str, str]] = []
    async with serving(stand_in) as kube:
        following = asyncio.create_task(
            follow(
                kube,
                "/api/v1/namespaces/ml/pods",
                {},
                on_list=lambda items: lists.append([item["metadata"]["name"] for item in items]),
                on_event=lambda kind, body: events.append((kind, body["metadata"]["resourceVersion"])),
            )
        )
        with caplog.at_level(logging.WARNING, logger="llm_operator.kube.watch"):
            for _ in range(500):
                if caplog.records:
                    break
                await asyncio.sleep(0.01)
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
    assert stand_in.seen == [
        ("list", None),
        ("watch", "10"),  # from the list's version
        ("watch", "15"),  # the stream ended: on from the bookmark
        ("list", None),  # 410: at once, without a warning
        ("watch", "20"),
    ]
    assert lists == [["a"], ["b"]]
    assert events == [("MODIFIED", "11")]  # bookmarks and errors are no changes
    [warning] = caplog.records
    assert "HTTP 403 Forbidden: cannot watch pods" in warning.getMessage()
    assert f"listing again in {RETRY_SECONDS:.0f} s" in warning.getMessage()  # the first refusal
