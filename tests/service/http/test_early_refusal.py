"""While SLO mode sheds, classify requests are refused at their head by the protocol
(service.http.early_refusal): the same 429 admission gives, no ASGI task, keep-alive and pipelining
intact, and nothing else gated. Raw sockets against a real uvicorn with `boostserve serve`'s own
config (`service.commands.serve.uvicorn_config`), the app on the session's synthetic artifact."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from bench.server import free_port
from service.commands.serve import uvicorn_config
from service.http.app import create_app
from service.http.early_refusal import gated_route
from tests.service.http import images
from tests.service.http.conftest import settings_for

GLOBAL = {"max_accuracy_drop": 0.01}
SLO_MESSAGE = "overloaded at the cheapest allowed operating point (SLO mode); retry later"
TIMEOUT_S = 20.0


class Served:
    """A running server: its port, protocol class, app, and how many requests reached the fast path."""

    def __init__(self, port: int, protocol: Any, app: Any) -> None:
        self.port, self.protocol, self.app = port, protocol, app
        self.fast_path_calls = 0

    def shed(self, on: bool) -> None:
        """Make SLO mode's own rule say "shed" (as at the floor with a long queue), or restore it."""
        slo = self.app.state.live.slo
        if on:
            slo.should_shed = lambda delay: True
        else:
            slo.__dict__.pop("should_shed", None)


@contextlib.contextmanager
def serving(artifact: Path, **overrides: Any) -> Iterator[Served]:
    settings = settings_for(artifact, host="127.0.0.1", port=free_port(), **overrides)
    app = create_app(settings)
    config = uvicorn_config(settings, app, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    served = Served(settings.port, config.http, app)
    front = app.front

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        served.fast_path_calls += 1
        await front(scope, receive, send)

    app.front = counting
    try:
        if settings.latency_target_ms is not None:
            while app.state.live is None or app.state.live.slo is None:  # the first control tick
                assert time.monotonic() < deadline, "SLO mode never ticked"
                time.sleep(0.02)
        yield served
    finally:
        server.should_exit = True
        thread.join(timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def slo_server(synthetic_artifact: Path) -> Iterator[Served]:
    with serving(
        synthetic_artifact, default_budget=GLOBAL, latency_target_ms=50, max_accuracy_drop_under_load=0.2
    ) as s:
        yield s


@pytest.fixture
def shedding(slo_server: Served) -> Iterator[Served]:
    slo_server.shed(True)
    slo_server.fast_path_calls = 0
    try:
        yield slo_server
    finally:
        slo_server.shed(False)


def connect(served: Served) -> socket.socket:
    return socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT_S)


def classify_request(path: str = "/v1/classify", headers: str = "", body: bytes | None = None) -> bytes:
    body = images.png() if body is None else body
    head = f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: image/png\r\ncontent-length: {len(body)}\r\n{headers}\r\n"
    return head.encode() + body


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length body) from `sock`, keeping what follows it in `buffer`."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {bytes(buffer)!r}"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"header {name} twice: {head!r}"
        headers[name.lower()] = value.strip()
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        rest += chunk
    buffer[:] = rest[length:]
    return status, headers, rest[:length]


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_shed_request_gets_admissions_own_429_at_its_head_without_reaching_the_app(shedding: Served) -> None:
    with connect(shedding) as sock:
        buffer = bytearray()
        sock.sendall(classify_request())
        status, headers, body = read_response(sock, buffer)
        assert shedding.fast_path_calls == 0  # refused by the protocol: no ASGI task ran
        assert status == 429
        assert json.loads(body) == {"error": {"type": "over_capacity", "message": SLO_MESSAGE}}
        assert headers["content-type"] == "application/json" and headers["retry-after"] == "1"
        assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"]) and "date" in headers
        assert "connection" not in headers  # keep-alive

        # The same request through admission (the gate switched off): the same answer.
        gate = shedding.protocol.early_refusal
        shedding.protocol.early_refusal = None
        try:
            sock.sendall(classify_request())
            status2, headers2, body2 = read_response(sock, buffer)
        finally:
            shedding.protocol.early_refusal = gate
        assert shedding.fast_path_calls == 1
        assert (status2, body2) == (status, body)
        assert {k: headers2[k] for k in ("content-type", "retry-after")} == {
            k: headers[k] for k in ("content-type", "retry-after")
        }


def test_keep_alive_and_pipelined_requests_are_answered_in_order(shedding: Served) -> None:
    livez = b"GET /livez HTTP/1.1\r\nhost: t\r\n\r\n"
    with connect(shedding) as sock:
        buffer = bytearray()
        sock.sendall(classify_request() + classify_request() + livez + classify_request())
        statuses = [read_response(sock, buffer)[0] for _ in range(4)]
        assert statuses == [429, 429, 200, 429]
        # The last head arrived while /livez was still being served: queued behind it as uvicorn
        # queues pipelined requests, then refused by admission (the one request that reached the app).
        assert shedding.fast_path_calls == 1
        sock.sendall(livez)  # still open
        assert read_response(sock, buffer)[0] == 200


def test_connection_close_and_100_continue_are_answered_then_closed(shedding: Served) -> None:
    with connect(shedding) as sock:
        buffer = bytearray()
        sock.sendall(classify_request(headers="connection: close\r\n"))
        status, headers, _ = read_response(sock, buffer)
        assert (status, headers["connection"]) == (429, "close") and closed(sock)
    with connect(shedding) as sock:
        buffer = bytearray()
        body = images.png()
        head = classify_request(headers="expect: 100-continue\r\n", body=body)[: -len(body)]
        sock.sendall(head)  # the body is never sent: the client waits for 100 Continue
        status, headers, _ = read_response(sock, buffer)
        assert (status, headers["connection"]) == (429, "close") and closed(sock)


def test_the_client_request_id_is_kept_and_v2_infer_gets_the_protocol_shape(shedding: Served) -> None:
    with connect(shedding) as sock:
        buffer = bytearray()
        sock.sendall(classify_request(headers="x-request-id: trace-42\r\n"))
        assert read_response(sock, buffer)[1]["x-request-id"] == "trace-42"
        for path in ("/v2/models/m/infer", "/v2/models/m/versions/1/infer"):
            sock.sendall(classify_request(path))
            status, _, body = read_response(sock, buffer)
            assert (status, json.loads(body)) == (429, {"error": SLO_MESSAGE, "error_type": "over_capacity"})


def test_nothing_but_classify_is_gated_and_nothing_is_refused_when_slo_mode_does_not_shed(slo_server: Served) -> None:
    with connect(slo_server) as sock:
        buffer = bytearray()
        sock.sendall(classify_request())
        assert read_response(sock, buffer)[0] == 200  # not shedding: served
        slo_server.shed(True)
        try:
            for request in (
                b"GET /livez HTTP/1.1\r\nhost: t\r\n\r\n",
                b"GET /readyz HTTP/1.1\r\nhost: t\r\n\r\n",
                b"GET /v1/budget HTTP/1.1\r\nhost: t\r\n\r\n",
                b"GET /v2/models/m HTTP/1.1\r\nhost: t\r\n\r\n",
            ):
                sock.sendall(request)
                assert read_response(sock, buffer)[0] != 429, request
        finally:
            slo_server.shed(False)


def test_the_refusals_are_counted_in_the_request_and_error_metrics(shedding: Served) -> None:
    metrics = shedding.app.state.metrics

    def count() -> tuple[float, float]:
        lines = metrics.render().decode().splitlines()

        def total(prefix: str, *labels: str) -> float:
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in lines
                if line.startswith(prefix) and all(label in line for label in labels)
            )

        requests = total("boostserve_requests_total{", 'route="/v1/classify"', 'status_class="4xx"')
        return requests, total("boostserve_errors_total{", 'error_type="over_capacity"')

    before = count()
    with connect(shedding) as sock:
        buffer = bytearray()
        for _ in range(3):
            sock.sendall(classify_request())
            assert read_response(sock, buffer)[0] == 429
    after = count()
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)


def test_without_slo_mode_the_protocol_has_no_gate(synthetic_artifact: Path) -> None:
    settings = settings_for(synthetic_artifact)
    assert uvicorn_config(settings, create_app(settings)).http.early_refusal is None
    slo = settings_for(synthetic_artifact, latency_target_ms=50)
    assert uvicorn_config(slo, create_app(slo)).http.early_refusal is not None


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        (b"POST", b"/v1/classify", "/v1/classify"),
        (b"POST", b"/v2/models/m/infer", "/v2/models/{name}/infer"),
        (b"POST", b"/v2/models/m/versions/3/infer", "/v2/models/{name}/versions/{version}/infer"),
        (b"GET", b"/v1/classify", None),
        (b"POST", b"/v1/budget", None),
        (b"POST", b"/v1/classify/x", None),
        (b"POST", b"/v2/models/m/ready", None),
        (b"POST", b"/v2/models//infer", None),
    ],
)
def test_gated_routes(method: bytes, path: bytes, route: str | None) -> None:
    assert gated_route(method, path) == route


@pytest.mark.parametrize("adapter", ["v1 raw (fast path)", "v1 JSON (route)", "v2 infer"])
def test_an_answered_requests_time_counts_from_its_head(slo_server: Served, adapter: str) -> None:
    """SLO mode's shed limit reads what answered requests took (`LiveControl.latencies`); a request
    that waited between its head and its handler (a busy loop; here, a body sent late) waited as
    the client sees it, so its time counts from the head the protocol stamped."""
    if adapter == "v1 raw (fast path)":
        request = classify_request()
    elif adapter == "v1 JSON (route)":
        body = json.dumps({"image": base64.b64encode(images.png()).decode()}).encode()
        request = classify_request(body=body).replace(b"content-type: image/png", b"content-type: application/json")
    else:
        tensor = {"name": "image", "shape": [1, 8, 8, 1], "datatype": "UINT8", "data": [7] * 64}
        body = json.dumps({"inputs": [tensor]}).encode()
        request = classify_request("/v2/models/synthetic-boostnet/infer", body=body).replace(
            b"content-type: image/png", b"content-type: application/json"
        )
    head, _, body = request.partition(b"\r\n\r\n")
    latencies = slo_server.app.state.live.latencies
    with connect(slo_server) as sock:
        buffer = bytearray()
        sock.sendall(head + b"\r\n\r\n")
        time.sleep(0.3)
        body_sent = time.monotonic()
        sock.sendall(body)
        status, _, answer = read_response(sock, buffer)
        assert status == 200, answer
    answered_at, took = latencies._answers[-1]  # (the window keeps only its last 0.5 s: read the newest)
    assert answered_at >= body_sent and took >= 0.3
