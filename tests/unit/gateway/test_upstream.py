"""The upstream client: TCP keep-alive probes, so a replica on a lost node is noticed; how a failed attempt
broke, which decides whether it is tried again."""

from __future__ import annotations

import socket

import aiohttp
import pytest

from llm_operator.gateway.upstream import UpstreamSettings, broken, keepalive_socket


def test_upstream_sockets_probe_a_silent_peer() -> None:
    settings = UpstreamSettings(keepalive_idle=30, keepalive_interval=10, keepalive_count=3)
    info = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 8080))
    with keepalive_socket(settings)(info) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3


async def test_a_refused_connection_is_a_connect_failure() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connecting is refused
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError) as caught:
                await session.get(f"http://127.0.0.1:{port}/")
    assert broken(caught.value) == "connect"


def test_client_errors_map_to_how_the_attempt_broke() -> None:
    assert broken(aiohttp.ConnectionTimeoutError()) == "connect"  # a timeout while connecting
    assert broken(aiohttp.SocketTimeoutError()) == "timeout"  # connected, then silence
    assert broken(aiohttp.ServerTimeoutError()) == "timeout"
    assert broken(aiohttp.ServerDisconnectedError()) == "disconnect"
    assert broken(aiohttp.ClientOSError(104, "Connection reset by peer")) == "disconnect"
    assert broken(aiohttp.ClientPayloadError("truncated")) == "failed"
