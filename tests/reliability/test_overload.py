"""Overload and soak against a real `boostserve serve` (compute-bound synthetic model, small queues).

Overload: measure capacity (closed loop, as many workers as the queue admits), then offer ~4x
that rate (open loop) for a bounded time. Asserted:
  - only 200 / 429 / 503 answers, and every 429/503 carries Retry-After; no dropped connections;
  - admitted (200) requests' p99 stays bounded (queueing is bounded by max_queue);
  - boostserve_queue_depth (read from /metrics during the run) never exceeds max_queue;
  - RSS (/proc/PID/status) does not grow without bound;
  - the server is ready and answers afterwards.
Soak (slow marker): 5 minutes at ~70 % of capacity: no errors, RSS growth < 10 %, latency stable
(first vs last minute p50/p99). Figures land in build/reliability/{overload,soak}*.json.

    .venv/bin/pytest -m slow tests/reliability/test_overload.py     # long overload + soak
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.http_suite import pinned
from bench.machine import cpu_ticks
from tests.reliability import _images as img
from tests.reliability._load import (
    RunResult,
    Sampler,
    closed_loop,
    histogram_buckets,
    histogram_quantile,
    latency_summary,
    open_loop,
    percentile,
)
from tests.reliability._results import record

MAX_QUEUE = 16
MAX_BATCH = 8
#: The Python client cannot offer more than this on the shared 2-core VM (it shares the CPU with
#: the server); if 4x capacity is above it, the test records the multiple it really reached.
CLIENT_RATE_CAP = 600.0

OVERLOAD_SETTINGS: dict[str, Any] = {
    "max_queue": MAX_QUEUE,
    "max_batch_size": MAX_BATCH,
    "max_batch_wait_ms": 2.0,
    "request_timeout_s": 30.0,
    # every image runs every stage: a constant cost per image, so capacity is well defined
    "early_exit": False,
    "log_level": "warning",
    "stage_execution": "thread",
}


def classify_request(png: bytes) -> Any:
    def make() -> dict[str, Any]:
        return {
            "method": "POST",
            "url": "/v1/classify",
            "content": png,
            "headers": {"Content-Type": "image/png"},
        }

    return make


def warm_up(base_url: str, png: bytes, n: int = 20) -> None:
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for _ in range(n):
            response = client.post("/v1/classify", content=png, headers={"Content-Type": "image/png"})
            assert response.status_code == 200, response.text


def measure_capacity(base_url: str, png: bytes, seconds: float) -> tuple[float, RunResult]:
    """Closed loop with MAX_QUEUE workers (never more images in flight than admitted): req/s."""
    result = closed_loop(base_url, classify_request(png), workers=MAX_QUEUE, duration=seconds)
    statuses = result.statuses()
    assert set(statuses) <= {"200", "429"}, statuses
    return result.throughput(), result


def summarize_overload(run: RunResult, sampler: Sampler, capacity: float, rate: float) -> dict[str, Any]:
    admitted = run.ok()
    refused = [r for r in run.records if r.status in (429, 503)]
    sent = len(run.records)
    rss = sampler.rss_series()
    return {
        "capacity_rps": round(capacity, 1),
        "target_rate_rps": round(rate, 1),
        "offered_rps": round(sent / run.duration, 1) if run.duration else None,
        "offered_multiple": round(sent / run.duration / capacity, 2) if run.duration and capacity else None,
        "duration_s": round(run.duration, 1),
        "requests": sent,
        "client_skipped": run.skipped,
        "statuses": run.statuses(),
        "admitted_rps": round(len(admitted) / run.duration, 1) if run.duration else None,
        "admitted_latency": latency_summary(admitted),
        "refused_latency": latency_summary(refused),
        "retry_after_missing": sum(1 for r in refused if not r.retry_after),
        "retry_after_values": sorted({r.retry_after for r in refused if r.retry_after})[:10],
        "bad_bodies": sum(1 for r in run.records if r.status is not None and not r.body_ok),
        "max_queue": MAX_QUEUE,
        "max_queue_depth_seen": sampler.max_gauge("boostserve_queue_depth"),
        "max_inflight_seen": sampler.max_gauge("boostserve_inflight_requests"),
        "metric_samples": len(sampler.samples),
        "rss_mb_start": round(rss[0] / 2**20, 1) if rss else None,
        "rss_mb_max": round(max(rss) / 2**20, 1) if rss else None,
        "rss_mb_end": round(rss[-1] / 2**20, 1) if rss else None,
        "rss_mb_first_10s_max": _rss_window(sampler, 0.0, 10.0),
        "rss_mb_last_10s_max": _rss_window(sampler, run.duration - 10.0, run.duration + 1.0),
    }


def _rss_window(sampler: Sampler, start: float, end: float) -> float | None:
    values = [s["rss"] for s in sampler.samples if s.get("rss") and start <= s["t"] < end]
    return round(max(values) / 2**20, 1) if values else None


#: Server on one CPU, the load generator (this process's threads) on another, as the bench does:
#: sharing the cores, the client was starved in about one run in three and recorded the server's
#: queueing as its own latency, or could not offer enough load (the flaky test of issue 15).
#: OVERLOAD_SETTINGS pins stage_execution to "thread", the mode the server chose on two CPUs. On
#: one CPU "auto" now sends this artifact's long batches to the thread as well, but only after each
#: stage's first, measured batch; with "loop" they held the loop so requests waited unread (client
#: p50 2-3 s, server-side p99 <= 0.5 s; docs/reliability.md).
SERVER_CPUS, CLIENT_CPUS = {0}, [1]


def run_overload(load_artifact: Path, live_server: Any, *, seconds: float, label: str) -> dict[str, Any]:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the overload test needs two CPUs: one for the server, one for its load generator")
    server = live_server(load_artifact, cpus=SERVER_CPUS, **OVERLOAD_SETTINGS)
    with pinned(CLIENT_CPUS):
        return _run_overload(server, seconds=seconds, label=label)


def _run_overload(server: Any, *, seconds: float, label: str) -> dict[str, Any]:
    png = img.valid_png()
    warm_up(server.base_url, png)
    capacity, _ = measure_capacity(server.base_url, png, seconds=4.0)
    assert capacity > 0
    rate = min(4.0 * capacity, CLIENT_RATE_CAP)
    rss_before = server.rss()
    hist_before = _classify_histogram(server)
    steal_before, ticks_before = cpu_ticks()
    with Sampler(server.base_url, server.pid, interval=0.25) as sampler:
        run = open_loop(server.base_url, classify_request(png), rate=rate, duration=seconds, max_inflight=200)
        time.sleep(0.5)  # let the sampler see the queues drain
    steal_after, ticks_after = cpu_ticks()
    hist_after = _classify_histogram(server)
    summary = summarize_overload(run, sampler, capacity, rate)
    # The host's share of the run (/proc/stat steal): a failed client-side bound shows whether the VM
    # was stalled (in one CI run every answer, 429s included, waited ~5 s while the server's own
    # p99 stayed within 0.5 s).
    ticks = ticks_after - ticks_before
    summary["vm_steal_share"] = round((steal_after - steal_before) / ticks, 4) if ticks > 0 else None
    summary["rss_mb_before_overload"] = round(rss_before / 2**20, 1)
    # Server-side latency of admitted (2xx) requests, from boostserve_request_duration_seconds:
    # the upper bound of the histogram bucket holding the quantile (excludes client-side delays).
    summary["server_admitted_p50_le_s"] = histogram_quantile(hist_before, hist_after, 0.50)
    summary["server_admitted_p99_le_s"] = histogram_quantile(hist_before, hist_after, 0.99)
    with httpx.Client(base_url=server.base_url, timeout=10.0) as client:
        summary["ready_after"] = client.get("/readyz").status_code
        summary["valid_request_after"] = client.post(
            "/v1/classify", content=png, headers={"Content-Type": "image/png"}
        ).status_code
    summary["server_alive_after"] = server.alive()
    record(label, summary)
    return summary


def _classify_histogram(server: Any) -> dict[float, float]:
    return histogram_buckets(
        server.metrics(), "boostserve_request_duration_seconds", route="/v1/classify", status_class="2xx"
    )


def assert_overload(summary: dict[str, Any], *, min_multiple: float) -> None:
    statuses = summary["statuses"]
    assert set(statuses) <= {"200", "429", "503"}, f"unexpected answers under overload: {statuses}"
    assert statuses.get("200", 0) > 0, statuses
    assert statuses.get("429", 0) + statuses.get("503", 0) > 0, f"no load shedding at all: {statuses}"
    assert summary["retry_after_missing"] == 0
    assert summary["bad_bodies"] == 0
    assert summary["offered_multiple"] >= min_multiple, (
        f"the client offered only {summary['offered_multiple']}x capacity: {summary}"
    )
    # Queues are bounded by max_queue (images admitted and not answered, queued + running).
    assert summary["metric_samples"] >= 5
    assert summary["max_queue_depth_seen"] <= MAX_QUEUE, summary
    # p99 of admitted requests: at most a full queue (+ the batch running) ahead of them. Server side
    # (from the histogram, bucket upper bound): 4x that drain time, at least the 2.5 s bucket.
    # Client side (includes the load generator's own delays on the shared 2 cores): 10x + 1 s.
    drain_s = (MAX_QUEUE + MAX_BATCH) / summary["capacity_rps"]
    server_p99 = summary["server_admitted_p99_le_s"]
    assert server_p99 is not None and server_p99 <= max(2.5, 4.0 * drain_s), (server_p99, drain_s)
    bound_ms = 1000.0 * (10.0 * drain_s + 1.0)
    assert summary["admitted_latency"]["p99_ms"] <= bound_ms, (
        summary["admitted_latency"],
        bound_ms,
        {key: summary.get(key) for key in ("vm_steal_share", "refused_latency", "client_skipped", "duration_s")},
    )
    # Memory: bounded (no per-request leak and no unbounded buffering of refused requests).
    assert summary["rss_mb_max"] <= summary["rss_mb_before_overload"] * 1.5 + 64, summary
    assert summary["ready_after"] == 200 and summary["valid_request_after"] == 200
    assert summary["server_alive_after"]


def test_overload_4x_capacity_short(load_artifact: Path, live_server: Any) -> None:
    """Default suite: ~4x capacity for 8 s."""
    summary = run_overload(load_artifact, live_server, seconds=8.0, label="overload_short")
    # 1.5x, not 4x: on a busy CI machine the Python client shares the cores with the server and may
    # not reach 4x; shedding (429s) must still happen, which assert_overload checks.
    assert_overload(summary, min_multiple=1.5)


@pytest.mark.slow
def test_overload_4x_capacity_long(load_artifact: Path, live_server: Any) -> None:
    """60 s at ~4x capacity; RSS must also be flat between the first and the last 10 s."""
    summary = run_overload(load_artifact, live_server, seconds=60.0, label="overload_long")
    assert_overload(summary, min_multiple=2.5)
    # Flat, not just bounded: the last 10 s use no more memory than the first 10 s (+10 %, +16 MB).
    assert summary["rss_mb_last_10s_max"] <= summary["rss_mb_first_10s_max"] * 1.10 + 16, summary


# --------------------------------------------------------------------------------------------------
# soak
# --------------------------------------------------------------------------------------------------

SOAK_SECONDS = 300.0


def _window(records: list[Any], start: float, end: float) -> list[Any]:
    return [r for r in records if start <= r.start < end]


@pytest.mark.slow
def test_soak_70_percent_capacity(load_artifact: Path, live_server: Any) -> None:
    """5 minutes at ~70 % of capacity: no errors, RSS growth < 10 %, latency stable."""
    png = img.valid_png()
    # The soak is about leaks and drift, not shedding: a roomier queue so a hiccup of the shared
    # machine does not turn into 429s.
    server = live_server(load_artifact, **{**OVERLOAD_SETTINGS, "max_queue": 256})
    warm_up(server.base_url, png, n=50)
    capacity, _ = measure_capacity(server.base_url, png, seconds=10.0)
    rate = 0.7 * capacity
    with Sampler(server.base_url, server.pid, interval=2.0) as sampler:
        run = open_loop(server.base_url, classify_request(png), rate=rate, duration=SOAK_SECONDS, max_inflight=400)
    samples = [s for s in sampler.samples if s.get("rss")]
    # RSS after the first minute (allocator arenas, ORT caches settled) vs the end of the run.
    first_min = [s["rss"] for s in samples if 50.0 <= s["t"] <= 70.0] or [samples[0]["rss"]]
    rss_ref = max(first_min)
    rss_end = samples[-1]["rss"]
    first = [r for r in _window(run.records, 0.0, 60.0) if r.status == 200]
    last = [r for r in _window(run.records, SOAK_SECONDS - 60.0, SOAK_SECONDS + 1) if r.status == 200]
    summary = {
        "capacity_rps": round(capacity, 1),
        "rate_rps": round(rate, 1),
        "offered_rps": round(len(run.records) / run.duration, 1),
        "duration_s": round(run.duration, 1),
        "requests": len(run.records),
        "client_skipped": run.skipped,
        "statuses": run.statuses(),
        "errors": sum(1 for r in run.records if r.status != 200),
        "latency_all": latency_summary(run.ok()),
        "latency_first_minute": latency_summary(first),
        "latency_last_minute": latency_summary(last),
        "latency_per_minute": [
            latency_summary([r for r in _window(run.records, 60.0 * m, 60.0 * (m + 1)) if r.status == 200])
            for m in range(math.ceil(SOAK_SECONDS / 60.0))
        ],
        "loadavg_1min_every_30s": [s.get("loadavg") for i, s in enumerate(samples) if i % 15 == 0],
        "rss_mb_start": round(samples[0]["rss"] / 2**20, 1),
        "rss_mb_after_first_minute": round(rss_ref / 2**20, 1),
        "rss_mb_end": round(rss_end / 2**20, 1),
        "rss_mb_max": round(max(s["rss"] for s in samples) / 2**20, 1),
        "rss_growth_pct_after_first_minute": round(100.0 * (rss_end - rss_ref) / rss_ref, 2),
        "max_queue_depth_seen": sampler.max_gauge("boostserve_queue_depth"),
        "rss_mb_series_every_30s": [round(s["rss"] / 2**20, 1) for i, s in enumerate(samples) if i % 15 == 0],
    }
    record("soak", summary)
    assert summary["errors"] == 0, summary["statuses"]
    assert run.skipped == 0
    assert summary["rss_growth_pct_after_first_minute"] < 10.0, summary
    p99_first = summary["latency_first_minute"]["p99_ms"]
    p99_last = summary["latency_last_minute"]["p99_ms"]
    assert not math.isnan(p99_first) and not math.isnan(p99_last)
    # Stable = no trend beyond what a shared 2-core VM adds: p99 within 3x (+100 ms), p50 within 2x (+20 ms).
    assert p99_last <= 3.0 * p99_first + 100.0, (
        summary["latency_first_minute"],
        summary["latency_last_minute"],
    )
    assert percentile([r.latency for r in last], 50) <= 2.0 * percentile([r.latency for r in first], 50) + 0.02
