"""Reads the `/status` of an endpoint's loading replicas (Running, not Ready), and of its ready ones while
they may report adapters status does not show yet: the I/O behind `progress.py`.

Each read is one bounded GET to the pod's IP on the serving port (admitted by the endpoint's NetworkPolicy);
a replica that does not answer in time, or answers something else, is left out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import aiohttp

from llm_contract import STATUS_PATH, LoadStatus
from llm_operator.objects import Manifest, condition_true

TIMEOUT = aiohttp.ClientTimeout(total=1.0)
MAX_BODY_BYTES = 64 * 1024
"""A `/status` answer is a few hundred bytes; anything longer is not one."""
MAX_READS = 8
"""Replicas of one endpoint read per pass (the rest show through the ones read)."""


def loading_pods(pods: Sequence[Manifest], *, ready_too: bool = False) -> list[Manifest]:
    """The pods worth asking: running, with an IP, not being deleted, and not yet ready (unless
    `ready_too`)."""
    return [
        pod
        for pod in pods
        if pod.get("status", {}).get("phase") == "Running"
        and pod.get("status", {}).get("podIP")
        and not pod["metadata"].get("deletionTimestamp")
        and (ready_too or not condition_true(pod, "Ready"))
    ][:MAX_READS]


def status_url(pod: Manifest, port: int) -> str:
    """`http://<podIP>:<port>/status` (IPv6 addresses in brackets)."""
    ip = str(pod["status"]["podIP"])
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{STATUS_PATH}"


async def read_status(session: aiohttp.ClientSession, url: str) -> LoadStatus | None:
    """One replica's load status, or None when it does not answer one in time."""
    try:
        async with session.get(url, timeout=TIMEOUT, allow_redirects=False) as answer:
            if answer.status != 200:
                return None
            body = await answer.content.read(MAX_BODY_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    if len(body) > MAX_BODY_BYTES:
        return None
    try:
        return LoadStatus.from_json(json.loads(body))
    except ValueError:
        return None


async def read_loading(
    session: aiohttp.ClientSession, pods: Sequence[Manifest], port: int, *, ready_too: bool = False
) -> dict[str, LoadStatus]:
    """Pod name -> load status, for the loading (and with `ready_too` the ready) pods that answered."""
    asked = loading_pods(pods, ready_too=ready_too)
    answers = await asyncio.gather(*(read_status(session, status_url(pod, port)) for pod in asked))
    return {
        pod["metadata"]["name"]: answer
        for pod, answer in zip(asked, answers, strict=True)
        if answer is not None
    }
