"""Issue 15 item 7: connection holding. Raw sockets against a real `boostserve serve`.

Each test builds the hostile client itself and fails on the code before the fix: the 1 MB header
was answered 200, the over-limit connection 200, the silent and the half-sent heads and the short
body were never answered nor closed (the reads below time out instead), and the keep-alive
timeout was uvicorn's fixed 5 s. Bounds are generous: every "closed after N s" waits up to
READ_TIMEOUT_S for something that happens after ~1 s; only the keep-alive test compares 0.2 s
against uvicorn's 5 s default with a 4 s bound. The readiness polls of LiveServer.start use their
own connections, closed before the tests run.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability._server import LiveServer

READ_TIMEOUT_S = 20.0
LIMITS = {
    "max_header_bytes": 1024,
    "header_timeout_s": 1.0,
    "body_timeout_s": 1.0,
    "keep_alive_s": 0.2,
    "limit_concurrency": 4,
}


@pytest.fixture(scope="module")
def server(rel_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(
        rel_artifact,
        tmp_path_factory.mktemp("connections"),
        intra_op_threads=1,
        inter_op_threads=1,
        log_level="warning",
        **LIMITS,
    )
    with live.start():
        yield live


def _connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=READ_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (raises socket.timeout if it never does)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def _read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body (keep-alive: the socket stays open)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _status_and_body(raw: bytes) -> tuple[bytes, dict[str, object]]:
    head, body = raw.split(b"\r\n\r\n", 1)
    return head.split(b"\r\n", 1)[0], json.loads(body)


def test_head_over_the_limit_is_431(server: LiveServer) -> None:
    # 2 KiB of head in one send (one loopback segment: the server reads it whole, so closing
    # leaves nothing unread and cannot turn into a reset that would lose the 431).
    head = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 2048
    with _connect(server) as sock:
        sock.sendall(head)
        raw = _read_until_closed(sock)
    assert _status_and_body(raw) == (
        b"HTTP/1.1 431 Request Header Fields Too Large",
        {"error": {"type": "headers_too_large", "message": "request line and headers exceed 1024 bytes"}},
    )


def test_one_megabyte_header_is_never_served(server: LiveServer) -> None:
    """The issue's 1 MB header: the server refuses it (431, or a reset if it closed mid-upload)."""
    request = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (1 << 20) + b"\r\n\r\n"
    with _connect(server) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        raw = _read_until_closed(sock)
    assert raw == b"" or raw.startswith(b"HTTP/1.1 431 "), raw[:200]


def test_connection_that_sends_nothing_is_closed(server: LiveServer) -> None:
    with _connect(server) as sock:
        t0 = time.monotonic()
        raw = _read_until_closed(sock)
        waited = time.monotonic() - t0
    assert raw == b""
    assert 0.5 <= waited < READ_TIMEOUT_S


def test_half_sent_head_is_408(server: LiveServer) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow")
        raw = _read_until_closed(sock)
    assert _status_and_body(raw) == (
        b"HTTP/1.1 408 Request Timeout",
        {"error": {"type": "request_timeout", "message": "request head not received within 1 s"}},
    )


def test_body_shorter_than_content_length_is_408(server: LiveServer) -> None:
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(head + b"\x89PNG\r\n\x1a\n")
        raw = _read_until_closed(sock)
    assert _status_and_body(raw) == (
        b"HTTP/1.1 408 Request Timeout",
        {"error": {"type": "request_timeout", "message": "no request body bytes for 1 s"}},
    )
    # The server is still fine afterwards.
    with _connect(server) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 200 ")


def test_idle_keep_alive_connection_is_closed(server: LiveServer) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        t0 = time.monotonic()
        assert _read_until_closed(sock) == b""
        waited = time.monotonic() - t0
    assert waited < 4.0, waited  # keep_alive_s=0.2; uvicorn's own default is 5 s


@pytest.fixture(scope="module")
def patient_server(rel_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """limit_concurrency=4 with timeouts long enough that held connections stay open."""
    live = LiveServer(
        rel_artifact,
        tmp_path_factory.mktemp("connections-patient"),
        intra_op_threads=1,
        inter_op_threads=1,
        log_level="warning",
        limit_concurrency=4,
        keep_alive_s=120,
        header_timeout_s=120,
    )
    with live.start():
        yield live


def test_connections_over_the_limit_get_503(patient_server: LiveServer) -> None:
    """limit_concurrency=4 counts open connections including the asking one: 3 idle keep-alive
    connections (each answered first, so the server surely holds them) leave no room for a 4th."""
    server = patient_server
    held = [_connect(server) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        with _connect(server) as extra:
            extra.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = _read_until_closed(extra)
        assert raw.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), raw[:200]
        assert raw.endswith(b"\r\n\r\nService Unavailable")
    finally:
        for sock in held:
            sock.close()
