"""Bounded load generation against a live server (asyncio; httpx closed loop, raw keep-alive open loop), and a
metrics/RSS sampler.

Two shapes:
  - closed loop (`closed_loop`): N workers, each sends the next request when the previous one
    answered — measures capacity (throughput at saturation).
  - open loop (`open_loop`): requests start at a fixed rate whatever the server does (up to a cap
    on requests in flight, so the client itself stays bounded) — drives overload.

Every run is bounded by a duration *and* a request count. Results are plain records so the tests
can compute percentiles and the report script can summarise them.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.loadgen import _RawConnection
from tests.error_bodies import error_problem
from tests.reliability._server import parse_metrics, rss_bytes


@dataclass
class Record:
    start: float  # seconds since the run started
    latency: float  # seconds (to the full response, or to the error)
    status: int | None  # None: no HTTP answer
    error: str | None = None  # exception class name when status is None
    retry_after: str | None = None
    body_ok: bool = True  # the body had the expected shape (200: JSON; error: our envelope)


@dataclass
class RunResult:
    records: list[Record]
    duration: float
    skipped: int = 0  # open loop: arrivals not sent because the in-flight cap was reached

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            key = str(r.status) if r.status is not None else f"error:{r.error}"
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))

    def ok(self) -> list[Record]:
        return [r for r in self.records if r.status == 200]

    def throughput(self) -> float:
        return len(self.ok()) / self.duration if self.duration > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for an empty list."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(records: list[Record]) -> dict[str, float]:
    lat = [r.latency for r in records]
    return {
        "n": len(lat),
        "p50_ms": round(percentile(lat, 50) * 1000, 2) if lat else None,
        "p90_ms": round(percentile(lat, 90) * 1000, 2) if lat else None,
        "p99_ms": round(percentile(lat, 99) * 1000, 2) if lat else None,
        "max_ms": round(max(lat) * 1000, 2) if lat else None,
    }


RequestFactory = Callable[[], dict[str, Any]]
"""Returns httpx.request kwargs: method, url, content/json, headers, params."""


def _envelope_ok(response: httpx.Response) -> bool:
    return _body_ok(response.status_code, response.request.url.path, response.content)


def _body_ok(status: int, path: str, content: bytes) -> bool:
    """200: a JSON object; anything else: our error envelope for `path`."""
    try:
        body = json.loads(content)
    except ValueError:
        return False
    if status == 200:
        return isinstance(body, dict)
    return error_problem(path, body) is None


async def _one(client: httpx.AsyncClient, make: RequestFactory, t0: float, records: list[Record]) -> None:
    start = time.perf_counter()
    try:
        response = await client.request(**make())
    except httpx.HTTPError as exc:
        records.append(Record(start - t0, time.perf_counter() - start, None, type(exc).__name__))
        return
    records.append(
        Record(
            start - t0,
            time.perf_counter() - start,
            response.status_code,
            retry_after=response.headers.get("retry-after"),
            body_ok=_envelope_ok(response),
        )
    )


def _client(base_url: str, connections: int, timeout: float, keepalive: bool) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections if keepalive else 0)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout)


async def _closed_loop(
    base_url: str, make: RequestFactory, workers: int, duration: float, max_requests: int, timeout: float
) -> RunResult:
    records: list[Record] = []
    async with _client(base_url, workers, timeout, True) as client:
        t0 = time.perf_counter()
        end = t0 + duration

        async def worker() -> None:
            while time.perf_counter() < end and len(records) < max_requests:
                await _one(client, make, t0, records)

        await asyncio.gather(*(worker() for _ in range(workers)))
        return RunResult(records, time.perf_counter() - t0)


def closed_loop(
    base_url: str,
    make: RequestFactory,
    *,
    workers: int,
    duration: float,
    max_requests: int = 100_000,
    timeout: float = 30.0,
) -> RunResult:
    return asyncio.run(_closed_loop(base_url, make, workers, duration, max_requests, timeout))


def raw_request(base_url: str, spec: dict[str, Any]) -> tuple[str, bytes]:
    """(path, the bytes of one HTTP/1.1 keep-alive request) for a `RequestFactory` dict with method,
    url (a path), content and headers."""
    unsupported = set(spec) - {"method", "url", "content", "headers"}
    if unsupported:
        raise ValueError(f"the raw open loop sends method, url, content and headers only, not {sorted(unsupported)}")
    host = urlsplit(base_url).netloc
    content: bytes = spec.get("content", b"")
    headers = {"Host": host, **spec.get("headers", {}), "Content-Length": str(len(content))}
    head = f"{spec['method']} {spec['url']} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return urlsplit(spec["url"]).path, (head + "\r\n").encode("latin-1") + content


async def _open_loop(
    base_url: str,
    make: RequestFactory,
    rate: float,
    duration: float,
    max_inflight: int,
    timeout: float,
) -> RunResult:
    """Raw keep-alive connections, not httpx: httpx's own CPU per request saturated the client's core
    once a few hundred requests were in flight (the server's loop lag stayed under 15 ms while its
    429s, answered at the request head, took seconds client side), and the overload test then
    measured the client."""
    records: list[Record] = []
    skipped = 0
    tasks: set[asyncio.Task[None]] = set()
    n_total = int(rate * duration)
    split = urlsplit(base_url)
    host, port = split.hostname or "127.0.0.1", split.port or 80
    idle: list[_RawConnection] = []

    async def one(t0: float) -> None:
        path, payload = raw_request(base_url, make())
        conn = idle.pop() if idle else _RawConnection(host, port)
        start = time.perf_counter()
        try:
            status, headers, body = await asyncio.wait_for(conn.exchange(payload), timeout)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            records.append(Record(start - t0, time.perf_counter() - start, None, type(exc).__name__))
            await conn.close()
            return
        records.append(
            Record(
                start - t0,
                time.perf_counter() - start,
                status,
                retry_after=headers.get("retry-after"),
                body_ok=_body_ok(status, path, body),
            )
        )
        idle.append(conn)

    t0 = time.perf_counter()
    for i in range(n_total):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_inflight:
            skipped += 1
            continue
        task = asyncio.create_task(one(t0))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout + 5)
    for conn in idle:
        await conn.close()
    return RunResult(records, time.perf_counter() - t0, skipped)


def open_loop(
    base_url: str,
    make: RequestFactory,
    *,
    rate: float,
    duration: float,
    max_inflight: int = 256,
    timeout: float = 30.0,
) -> RunResult:
    return asyncio.run(_open_loop(base_url, make, rate, duration, max_inflight, timeout))


@dataclass
class Sampler:
    """Background thread: every `interval` s, RSS of `pid` and the gauges named in `gauges`."""

    base_url: str
    pid: int
    interval: float = 0.5
    gauges: tuple[str, ...] = ("boostserve_queue_depth", "boostserve_inflight_requests")
    samples: list[dict[str, Any]] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        t0 = time.perf_counter()
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while not self._stop.is_set():
                sample: dict[str, Any] = {"t": time.perf_counter() - t0, "loadavg": round(os.getloadavg()[0], 2)}
                try:
                    sample["rss"] = rss_bytes(self.pid)
                except (OSError, RuntimeError):
                    sample["rss"] = None
                try:
                    metrics = parse_metrics(client.get("/metrics").text)
                    for name in self.gauges:
                        sample[name] = {
                            ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-": value
                            for labels, value in metrics.get(name, [])
                        }
                except httpx.HTTPError:
                    self.errors += 1
                self.samples.append(sample)
                self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def max_gauge(self, name: str) -> float:
        values = [v for s in self.samples for v in s.get(name, {}).values()]
        return max(values) if values else math.nan

    def rss_series(self) -> list[int]:
        return [s["rss"] for s in self.samples if s.get("rss")]


def histogram_buckets(
    metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> dict[float, float]:
    """Cumulative bucket counts {le: count} of one labelled histogram series."""
    out: dict[float, float] = {}
    for sample_labels, value in metrics.get(f"{name}_bucket", []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            out[float(sample_labels["le"])] = out.get(float(sample_labels["le"]), 0.0) + value
    return out


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """Upper bound of the bucket holding quantile q of the observations made between two snapshots."""
    bounds = sorted(after)
    diff = [after[b] - before.get(b, 0.0) for b in bounds]
    if not diff or diff[-1] <= 0:
        return None
    target = q * diff[-1]
    for bound, count in zip(bounds, diff, strict=True):
        if count >= target:
            return bound
    return math.inf
