"""Issue 15 item 7, memory side: clients that send most of a large body and then stall.

Before the shared body budget, each of 100 connections sending 9.5 MB of a declared 10 MB body held
its 9.5 MB until its body timeout: ~1 GB resident (the issue measured 1.18 GB). Now the bytes held
by all requests in progress are bounded by `max_inflight_body_mb`: a body still arriving past it is
refused with 429 (after a bounded lingering read), and the server's process tree stays near its
idle size plus that budget. Raw sockets against a real `boostserve serve`.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.reliability._procs import tree_rss_bytes
from tests.reliability._results import record
from tests.reliability._server import LiveServer

CLIENTS = 100
DECLARED = 10 * 1024 * 1024
SENT = 9_500_000
BUDGET_MB = 64


@pytest.fixture
def server(rel_artifact: Path, tmp_path: Path) -> Any:
    live = LiveServer(
        rel_artifact,
        tmp_path,
        intra_op_threads=1,
        inter_op_threads=1,
        log_level="warning",
        max_body_bytes=DECLARED,
        max_inflight_body_mb=BUDGET_MB,
        body_timeout_s=60.0,
        limit_concurrency=4096,
    )
    with live.start():
        yield live


def _read_response(sock: socket.socket) -> bytes:
    """Head and Content-Length body of one response; b"" when nothing comes (the body is still held)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    except (TimeoutError, OSError):
        return data


def _stall(port: int, answers: list[bytes], sent: threading.Event) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        head = f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {DECLARED}\r\n\r\n"
        sock.sendall(head.encode())
        chunk = b"\0" * 65536
        left = SENT
        while left > 0:
            part = chunk[: min(left, len(chunk))]
            try:
                sock.sendall(part)
            except OSError:
                break  # refused and closed mid-body: the answer is read below
            left -= len(part)
        sent.set()
        sock.settimeout(5)
        answers.append(_read_response(sock))
    finally:
        sock.close()


def test_stalled_bodies_are_bounded_in_memory(server: LiveServer) -> None:
    before = tree_rss_bytes(server.pid)
    answers: list[bytes] = []
    events = [threading.Event() for _ in range(CLIENTS)]
    threads = [threading.Thread(target=_stall, args=(server.port, answers, e), daemon=True) for e in events]
    for thread in threads:
        thread.start()
    for event in events:
        assert event.wait(120)
    held = tree_rss_bytes(server.pid)  # every client has sent its bytes and stalls
    for thread in threads:
        thread.join(timeout=60)
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 429")]
    assert refused, "no body was refused"
    body = json.loads(refused[0].split(b"\r\n\r\n", 1)[1])
    assert body == {
        "error": {
            "type": "over_capacity",
            "message": f"request bodies in progress are over the limit of {BUDGET_MB << 20} bytes; retry later",
        }
    }
    assert all(b"retry-after: 1" in a.lower() for a in refused)
    growth = held - before
    record(
        "body_budget",
        {
            "clients": CLIENTS,
            "sent_bytes": SENT,
            "budget_mib": BUDGET_MB,
            "refused": len(refused),
            "rss_before": before,
            "rss_held": held,
        },
    )
    assert growth < (BUDGET_MB + 64) << 20, f"RSS grew by {growth >> 20} MiB with {len(refused)} refused"
