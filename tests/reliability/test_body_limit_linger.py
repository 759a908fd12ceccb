"""An early 413 reaches a client that writes its whole body before reading (Python's urllib).

Why: the middleware refuses a Content-Length over the limit before reading the body. Closing a
socket with unread data in its receive buffer makes the kernel send RST, and a client still
writing (or not yet reading) gets ConnectionResetError instead of the 413. The middleware reads
and discards a bounded remainder first (like nginx's lingering close). Against a real `boostserve
serve` because the reset is the transport's behaviour, which TestClient does not have.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.types import Message, Receive

from service.http.middleware import LINGER_MAX_BYTES, _linger
from tests.reliability._server import LiveServer

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(rel_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer(rel_artifact, tmp_path_factory.mktemp("linger"), max_body_bytes=LIMIT, log_level="warning") as live:
        yield live


def _post(server: LiveServer, size: int) -> urllib.error.HTTPError:
    request = urllib.request.Request(
        f"{server.base_url}/v1/classify", data=b"\0" * size, headers={"Content-Type": "image/png"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    return caught.value


@pytest.mark.parametrize("size", [LIMIT + 1, 4 * 1024 * 1024])
def test_urllib_gets_the_413_body(server: LiveServer, size: int) -> None:
    assert size - LIMIT <= LINGER_MAX_BYTES
    error = _post(server, size)
    assert error.code == 413
    body = json.loads(error.read())
    assert body["error"]["type"] == "payload_too_large"
    assert body["error"]["message"] == f"request body is {size} bytes, over the limit of {LIMIT}"
    assert server.alive()


def test_urllib_gets_the_413_for_a_chunked_body(server: LiveServer) -> None:
    chunks = (b"\0" * 65536 for _ in range(64))  # 4 MiB, no Content-Length: counted while streaming
    request = urllib.request.Request(
        f"{server.base_url}/v1/classify",
        data=chunks,
        headers={"Content-Type": "image/png", "Transfer-Encoding": "chunked"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413
    assert json.loads(caught.value.read())["error"]["message"] == f"request body is over the limit of {LIMIT} bytes"


def test_a_stalled_body_does_not_hold_the_connection(server: LiveServer) -> None:
    """Headers promise more than the limit, a few bytes follow, then nothing: the 413 still comes
    (after LINGER_S; the 30 s socket timeout only catches a server that would wait forever)."""
    host, port = "127.0.0.1", server.port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {LIMIT + 1000}\r\n\r\n".encode()
            + b"\0" * 100
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ")


def _receive_from(messages: list[Message]) -> tuple[Receive, list[int]]:
    calls = [0]

    async def receive() -> Message:
        calls[0] += 1
        return messages[min(calls[0], len(messages)) - 1]

    return receive, calls


def test_linger_bounds() -> None:
    endless: list[Message] = [{"type": "http.request", "body": b"\0" * (1 << 20), "more_body": True}]
    receive, calls = _receive_from(endless)
    asyncio.run(_linger(receive, {"headers": []}, None))
    assert calls[0] == LINGER_MAX_BYTES // (1 << 20) + 1  # stops once past the byte bound

    receive, calls = _receive_from(endless)
    asyncio.run(_linger(receive, {"headers": []}, LINGER_MAX_BYTES + 1))
    assert calls[0] == 0  # a declared remainder past the bound is not read at all

    receive, calls = _receive_from(endless)
    asyncio.run(_linger(receive, {"headers": [(b"expect", b"100-continue")]}, 10))
    assert calls[0] == 0  # reading would send 100 Continue and invite the body

    done: list[Message] = [{"type": "http.request", "body": b"x", "more_body": False}]
    receive, calls = _receive_from(done)
    asyncio.run(_linger(receive, {"headers": []}, 1))
    assert calls[0] == 1
