"""The gateway process's bounds on what one client may cost it (`gateway.limits`), seen from raw sockets on
loopback: header bytes (431), header and body read deadlines (408), connection caps (503, unread), the
budget of buffered bodies (503 + Retry-After). Small limits via the flags keep each test to seconds."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from llm_devstack.processes import StandaloneGateway

Start = Callable[..., StandaloneGateway]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Start a gateway process with these flags (stopped at the end)."""
    started: list[StandaloneGateway] = []

    def run(*flags: str) -> StandaloneGateway:
        started.append(StandaloneGateway(tmp_path / f"gateway-{len(started)}.log", *flags).start())
        return started[-1]

    yield run
    for gateway in started:
        gateway.stop()


def connect(gateway: StandaloneGateway, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the traffic port from loopback address `source`."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the gateway closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def request(sock: socket.socket, path: str = "/nothing") -> int:
    """Send a GET on a kept-alive connection; the answer's status."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    raw = b""
    while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < _length(raw):
        chunk = sock.recv(65536)
        assert chunk, "closed before the answer was complete"
        raw += chunk
    return answer(raw)[0]


def _length(raw: bytes) -> int:
    match = re.search(rb"content-length: (\d+)", raw.partition(b"\r\n\r\n")[0], re.IGNORECASE)
    return int(match.group(1)) if match else 0


def test_an_oversized_header_gets_431_and_memory_stays(start: Start) -> None:
    gateway = start()
    sock = connect(gateway)
    sock.sendall(b"GET /x HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 64 * 1024 + b"\r\n\r\n")
    status, headers, body = answer(read_all(sock))
    assert status == 431
    assert headers["connection"] == "close"
    assert json.loads(body)["error_type"] == "request_header_fields_too_large"

    before = gateway.rss()
    held = []
    for _ in range(16):  # unfinished heads of 8 MiB each: buffered whole, they would take 128 MiB
        sock = connect(gateway)
        held.append(sock)
        try:
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: gw\r\nX-Big: ")
            for _ in range(128):
                sock.sendall(b"a" * 64 * 1024)
        except (BrokenPipeError, ConnectionResetError):
            continue  # refused part-way, as it should be
    grown = gateway.rss() - before
    for sock in held:
        sock.close()
    assert grown < 16 * 1024 * 1024, f"RSS grew {grown / 2**20:.1f} MiB"


def test_headers_never_finished_are_cut_at_the_deadline(start: Start) -> None:
    gateway = start("--header-seconds=1")
    silent = connect(gateway)
    slow = connect(gateway)
    slow.sendall(b"POST /x HTTP/1.1\r\nHost: gw\r\n")
    slow.settimeout(0.2)
    raw, began = b"", time.monotonic()
    while time.monotonic() - began < 8:  # one header line every 0.2 s: each byte used to keep it open
        try:
            slow.sendall(b"X-Drip: 1\r\n")
            if not (chunk := slow.recv(65536)):
                break
            raw += chunk
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    assert time.monotonic() - began < 4, "the slow connection stayed open"
    status, _, body = answer(raw)
    assert (status, json.loads(body)["error_type"]) == (408, "request_timeout")
    assert read_all(silent) == b""  # nothing was sent: closed without an answer


def test_a_half_sent_body_gets_408_at_the_body_deadline(start: Start) -> None:
    gateway = start("--body-seconds=1", "--route=ml/falcon=127.0.0.1:1")
    sock = connect(gateway)
    sock.sendall(
        b"POST /endpoints/ml/falcon/generate HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
        b"content-length: 100\r\n\r\n" + b'{"inputs": "'
    )
    sock.settimeout(5)
    status, headers, body = answer(read_all(sock))
    assert (status, headers["connection"]) == (408, "close")
    assert json.loads(body) == {
        "error": "request body not received within 1s",
        "error_type": "request_timeout",
    }


def test_connections_over_the_caps_are_refused_and_the_rest_served(start: Start) -> None:
    gateway = start("--max-connections=4", "--max-connections-per-client=2")
    first = [connect(gateway) for _ in range(2)]
    assert [request(sock) for sock in first] == [404, 404]  # admitted (and counted) before the next

    def refused(source: str) -> None:
        sock = connect(gateway, source)
        status, headers, _ = answer(read_all(sock))  # answered without being read, then closed
        assert (status, headers["retry-after"]) == (503, "1")

    refused("127.0.0.1")  # a third from the same peer
    second = [connect(gateway, "127.0.0.2") for _ in range(2)]
    assert [request(sock) for sock in second] == [404, 404]
    refused("127.0.0.3")  # a fifth in all
    assert [request(sock) for sock in first + second] == [404] * 4  # the admitted ones stay served
    first.pop().close()
    time.sleep(0.2)
    assert request(connect(gateway)) == 404  # a closed connection frees its place


def _post(gateway: StandaloneGateway, size: int) -> socket.socket:
    sock = connect(gateway)
    body = json.dumps({"inputs": "x" * (size - 14)}).encode()
    sock.sendall(
        b"POST /endpoints/ml/asleep/generate HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def _held(gateway: StandaloneGateway) -> float:
    text = httpx.get(f"{gateway.admin_url}/metrics").text
    line = 'llm_gateway_requests_held{endpoint="asleep",namespace="ml"}'
    return next((float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)), 0.0)


def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"not within 5s: {what}")


def test_the_body_budget_counts_held_requests_and_refuses_over_it(start: Start) -> None:
    gateway = start("--body-budget-bytes=100000", "--route=ml/asleep=", "--hold-timeout=60")
    held = _post(gateway, 60_000)  # held: the endpoint never wakes; its body stays buffered
    _until(lambda: _held(gateway) == 1, "the first request held")
    over = _post(gateway, 60_000)
    status, headers, body = answer(read_all(over))
    assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
    assert json.loads(body)["error_type"] == "overloaded"
    held.close()  # its client goes away: its bytes go back to the budget
    _until(lambda: _held(gateway) == 0, "the held request gone")
    again = _post(gateway, 60_000)
    _until(lambda: _held(gateway) == 1, "a new request held within the budget")
    again.close()
