"""Closed-loop HTTP load generator: N clients, each looping request -> response -> next request.

Why closed-loop: it measures the throughput the server sustains at a given concurrency and the
latency each client sees at that throughput (an open-loop generator would measure queueing at an
arbitrary arrival rate instead). Two client implementations:

  - "raw" (default): asyncio streams speaking HTTP/1.1 keep-alive with pre-built request bytes
    (request line + headers + PNG body are one `bytes` per image, built before timing). It costs
    a few tens of µs of CPU per request, so on a 2-core machine the client does not steal the
    server's CPU or become the bottleneck.
  - "httpx": one `httpx.AsyncClient` with connection limits sized to the concurrency — the
    ordinary Python client, several times more CPU per request; kept to quantify that difference.
The client's own CPU time per request (getrusage of this process over the measured window) is
always reported next to the results, so a client-bound cell is visible as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

CLIENT_KINDS = ("raw", "httpx")


@dataclass
class LoadResult:
    """Everything recorded in one measured window (requests started and finished inside it)."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    image_index: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # -1 when the answer could not be read
    exits: list[int] = field(default_factory=list)  # 1-based, -1 when unknown
    macs: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    thresholds: list[Any] | None = None
    first_error: str | None = None
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    warmup_requests: int = 0
    next_index: int = 0  # where the image counter stopped: the next cell continues from here

    @property
    def count(self) -> int:
        return len(self.latencies_s)


class Connection(Protocol):
    """A client's connection for a custom protocol (bench.oip_load's gRPC): request image `index`."""

    async def request(self, index: int) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


#: An answer body -> (label, exit, macs, server latency ms, thresholds).
Parser = Callable[[bytes], tuple[int, int, float, float, Any]]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_raw_requests(host: str, port: int, path: str, bodies: Sequence[bytes]) -> list[bytes]:
    """One complete HTTP/1.1 request (headers + body) per image, built once before the cell."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/png\r\n"
        "Accept: application/json\r\nConnection: keep-alive\r\nContent-Length: "
    ).encode()
    return [head + str(len(b)).encode() + b"\r\n\r\n" + b for b in bodies]


#: The boundary of the load generator's multipart bodies (curl's layout, bench.loadgen.build_multipart_requests).
MULTIPART_BOUNDARY = b"------------------------b0057e4ebe4c4b1d"


def build_multipart_requests(host: str, port: int, path: str, bodies: Sequence[bytes]) -> list[bytes]:
    """One complete multipart/form-data request per image, laid out as `curl -F file=@x.png` sends it."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={MULTIPART_BOUNDARY.decode()}\r\n"
        "Accept: application/json\r\nConnection: keep-alive\r\nContent-Length: "
    ).encode()
    part = b'Content-Disposition: form-data; name="file"; filename="image.png"\r\nContent-Type: image/png\r\n\r\n'
    forms = [
        b"--" + MULTIPART_BOUNDARY + b"\r\n" + part + b + b"\r\n--" + MULTIPART_BOUNDARY + b"--\r\n" for b in bodies
    ]
    return [head + str(len(f)).encode() + b"\r\n\r\n" + f for f in forms]


class _RawConnection:
    """A keep-alive HTTP/1.1 connection; enough of the protocol for uvicorn's JSON answers."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        status, _, body = await self.exchange(payload)
        return status, body

    async def exchange(self, payload: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one request; its status, headers (names lower-cased) and body."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "-1"))
        close = headers.get("connection", "").lower() == "close"
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if chunked:
            body = await self._read_chunked()
        elif length >= 0:
            body = await self.reader.readexactly(length)
        else:
            body = await self.reader.read()
            close = True
        if close:
            await self.close()
        return status, headers, body

    async def _read_chunked(self) -> bytes:
        assert self.reader is not None
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def parse_answer(body: bytes) -> tuple[int, int, float, float, Any]:
    """(label, exit, macs, server latency ms, thresholds) of a /v1/classify JSON answer.

    The response is `{"results": [{"label", "exit", "macs", ...}], "latency_ms", "budget": {...}}`
    (service.http.schemas.ClassifyResponse); a flat `{"label", "exit", "macs"}` is accepted too.
    """
    data = json.loads(body)
    item = data["results"][0] if isinstance(data.get("results"), list) else data
    budget = data.get("budget")
    thresholds = budget.get("thresholds") if isinstance(budget, dict) else None
    return (
        int(item["label"]),
        int(item["exit"]),
        float(item.get("macs", "nan")),
        float(data.get("latency_ms", "nan")),
        thresholds,
    )


async def run_closed_loop(
    *,
    host: str,
    port: int,
    path: str,
    bodies: Sequence[bytes],
    concurrency: int,
    duration_s: float,
    max_requests: int,
    warmup_s: float,
    client: str = "raw",
    timeout_s: float = 120.0,
    start_index: int = 0,
    requests: Sequence[bytes] | None = None,
    parse: Parser = parse_answer,
    connect: Callable[[], Connection] | None = None,
) -> LoadResult:
    """Warm up for warmup_s, then record until duration_s elapsed or max_requests completed.

    Images are taken round-robin from `bodies` by a shared counter starting at `start_index`, so
    the recorded image indices let the caller check every label against ground truth.
    Other protocols (bench.oip_load): `requests` replaces the pre-built raw HTTP requests (one per
    body), `connect` replaces the HTTP connection altogether, `parse` reads their answers.
    """
    if client not in CLIENT_KINDS:
        raise ValueError(f"client must be one of {CLIENT_KINDS}, got {client!r}")
    result = LoadResult()
    n_bodies = len(bodies)
    counter = [start_index]
    state = {"measuring": False, "stop": False, "t_start": 0.0, "t_end": 0.0}
    warm = [0]
    done = asyncio.Event()

    if requests is not None:
        raw_requests = list(requests)
    else:
        raw_requests = build_raw_requests(host, port, path, bodies) if client == "raw" and connect is None else []
    httpx_client: Any = None
    if client == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        httpx_client = httpx.AsyncClient(
            base_url=f"http://{host}:{port}", limits=limits, timeout=timeout_s, http2=False
        )
    headers = {"content-type": "image/png"}

    def record(t0: float, t1: float, index: int, status: int, body: bytes) -> None:
        # Throughput = completions inside the window (steady state), whenever they started.
        if not state["measuring"] or t1 < state["t_start"]:
            warm[0] += 1
            return
        if result.count >= max_requests:
            return
        result.latencies_s.append(t1 - t0)
        result.statuses.append(status)
        result.image_index.append(index)
        label = exit_ = -1
        macs = server = float("nan")
        if status == 200:
            try:
                label, exit_, macs, server, thresholds = parse(body)
                if result.thresholds is None:
                    result.thresholds = thresholds
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                result.first_error = result.first_error or f"unreadable answer: {exc}: {body[:200]!r}"
        elif result.first_error is None:
            result.first_error = f"HTTP {status}: {body[:300]!r}"
        result.labels.append(label)
        result.exits.append(exit_)
        result.macs.append(macs)
        result.server_ms.append(server)
        if result.count >= max_requests:
            state["t_end"] = t1
            done.set()

    async def worker() -> None:
        custom = connect() if connect is not None else None
        conn = _RawConnection(host, port) if client == "raw" and custom is None else None
        try:
            while not state["stop"]:
                index = counter[0] % n_bodies
                counter[0] += 1
                t0 = time.perf_counter()
                if custom is not None:
                    status, body = await asyncio.wait_for(custom.request(index), timeout_s)
                elif conn is not None:
                    status, body = await asyncio.wait_for(conn.request(raw_requests[index]), timeout_s)
                else:
                    response = await httpx_client.post(path, content=bodies[index], headers=headers)
                    status, body = response.status_code, response.content
                record(t0, time.perf_counter(), index, status, body)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            if not state["stop"]:
                result.first_error = result.first_error or f"connection error: {type(exc).__name__}: {exc}"
                done.set()
        finally:
            if conn is not None:
                await conn.close()
            if custom is not None:
                await custom.close()

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        cpu0 = _cpu_seconds()
        state["t_start"] = time.perf_counter()
        state["measuring"] = True
        try:
            await asyncio.wait_for(done.wait(), duration_s)
        except TimeoutError:
            state["t_end"] = time.perf_counter()
        if not state["t_end"]:  # a connection failed: stop the clock now
            state["t_end"] = time.perf_counter()
        result.client_cpu_s = _cpu_seconds() - cpu0
        state["stop"] = True
        result.wall_s = state["t_end"] - state["t_start"]
        result.warmup_requests = warm[0]
        result.next_index = counter[0]
        await asyncio.wait(tasks, timeout=timeout_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if httpx_client is not None:
            await httpx_client.aclose()
    return result


def summarize_latency(latencies_s: Sequence[float]) -> dict[str, float]:
    """Latency percentiles in ms (p50/p95/p99, mean, max) of one cell."""
    arr = np.asarray(latencies_s, dtype=np.float64) * 1e3
    if arr.size == 0:
        nan = float("nan")
        return {"p50": nan, "p95": nan, "p99": nan, "mean": nan, "max": nan}
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
        "max": float(arr.max()),
    }
