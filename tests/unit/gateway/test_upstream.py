"""The upstream client's sockets: TCP keep-alive probes, so a replica on a lost node is noticed."""

from __future__ import annotations

import socket

from llm_operator.gateway.upstream import UpstreamSettings, keepalive_socket


def test_upstream_sockets_probe_a_silent_peer() -> None:
    settings = UpstreamSettings(keepalive_idle=30, keepalive_interval=10, keepalive_count=3)
    info = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 8080))
    with keepalive_socket(settings)(info) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
