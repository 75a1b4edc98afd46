"""Free TCP ports on loopback, for the tests and benchmarks that start servers (no dependencies, so the
GPU check can use it on a machine without the project's virtualenv)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
