"""Open-loop HTTP load: Poisson arrivals at a set rate, whatever the server does.

Why open loop: closed-loop clients (bench.loadgen) send the next request only when the previous one
is answered, so an overloaded server slows its own offered load down and overload never shows.
Here each request is sent at its scheduled arrival time on its own keep-alive connection (taken
from a pool of idle ones, or opened), and its latency counts from that scheduled time, so time a
request spends waiting for a connection or a socket counts too. Each record says whether its
request opened a connection: HTTP/1.1 carries one request at a time, so when latency rises every
extra request in flight needs a new connection, and a load step brings a flood of them (each
costs the server an accept and a protocol of its own). An idle connection the server has closed
(its keep-alive timeout) is dropped from the pool, not reused.

A schedule is a list of phases (seconds, requests/s, image indices to draw from); arrivals within a
phase are a Poisson process (exponential gaps, seeded), images drawn uniformly from the phase's
indices. The generator's own limit: at most `max_connections` requests in flight; an arrival beyond
it is recorded as `dropped` (never silently skipped), so a client-bound run is visible.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.loadgen import _RawConnection, build_raw_requests

__all__ = ["OpenLoopResult", "Phase", "parse_answer", "run_open_loop"]


@dataclass(frozen=True)
class Phase:
    seconds: float
    rate: float  # requests per second (Poisson)
    images: Sequence[int] | np.ndarray  # indices into the request list to draw from


@dataclass
class OpenLoopResult:
    """One record per arrival, in arrival order."""

    scheduled_s: list[float] = field(default_factory=list)  # since the trace started
    phase: list[int] = field(default_factory=list)
    image: list[int] = field(default_factory=list)
    status: list[int] = field(default_factory=list)  # -1: dropped by the generator, -2: connection error
    latency_s: list[float] = field(default_factory=list)  # from the scheduled arrival (nan when no answer)
    label: list[int] = field(default_factory=list)
    exit: list[int] = field(default_factory=list)
    macs: list[float] = field(default_factory=list)
    degraded: list[bool] = field(default_factory=list)
    allowed_drop: list[float] = field(default_factory=list)  # max_accuracy_drop of the point served (nan: other knob)
    send_lag_s: list[float] = field(default_factory=list)  # how late the generator sent it (its own delay)
    new_connection: list[bool] = field(default_factory=list)  # this request opened a connection
    first_error: str | None = None

    @property
    def late_sends_s(self) -> float:
        """The largest lag of a send behind its schedule (the generator's own delay)."""
        return max(self.send_lag_s, default=0.0)

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {
            "scheduled_s": np.asarray(self.scheduled_s, dtype=np.float64),
            "phase": np.asarray(self.phase, dtype=np.int64),
            "image": np.asarray(self.image, dtype=np.int64),
            "status": np.asarray(self.status, dtype=np.int64),
            "latency_s": np.asarray(self.latency_s, dtype=np.float64),
            "label": np.asarray(self.label, dtype=np.int64),
            "exit": np.asarray(self.exit, dtype=np.int64),
            "macs": np.asarray(self.macs, dtype=np.float64),
            "degraded": np.asarray(self.degraded, dtype=bool),
            "allowed_drop": np.asarray(self.allowed_drop, dtype=np.float64),
            "send_lag_s": np.asarray(self.send_lag_s, dtype=np.float64),
            "new_connection": np.asarray(self.new_connection, dtype=bool),
        }


def parse_answer(body: bytes) -> tuple[int, int, float, bool, float]:
    """(label, exit, macs, degraded, allowed drop of the point served) of a /v1/classify JSON answer."""
    data = json.loads(body)
    item = data["results"][0]
    budget = data["budget"]
    point = budget.get("effective_budget") or budget.get("budget") or {}
    drop = float(point.get("max_accuracy_drop", "nan"))
    return int(item["label"]), int(item["exit"]), float(item["macs"]), bool(budget.get("degraded", False)), drop


def schedule(phases: Sequence[Phase], seed: int) -> list[tuple[float, int, int]]:
    """(arrival time s, phase, image index) of every request: Poisson within each phase."""
    rng = np.random.default_rng(seed)
    out: list[tuple[float, int, int]] = []
    start = 0.0
    for p, phase in enumerate(phases):
        t = start
        end = start + phase.seconds
        pool = np.asarray(phase.images, dtype=np.int64)
        while phase.rate > 0:
            t += float(rng.exponential(1.0 / phase.rate))
            if t >= end:
                break
            out.append((t, p, int(pool[rng.integers(pool.size)])))
        start = end
    return out


def _forget_if_closed(conn: _RawConnection) -> None:
    """An idle connection the server closed (keep-alive timeout) is let go, so request() opens a new
    one instead of writing to a dead socket."""
    if conn.reader is not None and conn.reader.at_eof() and conn.writer is not None:
        conn.writer.close()
        conn.reader = conn.writer = None


async def run_open_loop(
    *,
    host: str,
    port: int,
    path: str,
    bodies: Sequence[bytes],
    phases: Sequence[Phase],
    seed: int = 0,
    max_connections: int = 1024,
    timeout_s: float = 30.0,
) -> OpenLoopResult:
    """Send the schedule's requests at their times; wait for the last answer (up to timeout_s)."""
    requests = build_raw_requests(host, port, path, bodies)
    arrivals = schedule(phases, seed)
    result = OpenLoopResult()
    idle: list[_RawConnection] = []
    inflight = 0
    tasks: set[asyncio.Task[None]] = set()

    def record(index: int, status: int, latency: float, answer: tuple[int, int, float, bool, float] | None) -> None:
        result.status[index] = status
        result.latency_s[index] = latency
        if answer is not None:
            label, exit_, macs, degraded, drop = answer
            result.label[index], result.exit[index], result.macs[index] = label, exit_, macs
            result.degraded[index], result.allowed_drop[index] = degraded, drop

    async def one(index: int, payload: bytes, due: float) -> None:
        nonlocal inflight
        conn = idle.pop() if idle else _RawConnection(host, port)
        _forget_if_closed(conn)
        result.new_connection[index] = conn.writer is None  # request() opens it
        try:
            status, body = await asyncio.wait_for(conn.request(payload), timeout_s)
            answer = None
            if status == 200:
                try:
                    answer = parse_answer(body)
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    result.first_error = result.first_error or f"unreadable answer: {exc}: {body[:200]!r}"
            elif status != 429 and result.first_error is None:
                result.first_error = f"HTTP {status}: {body[:300]!r}"
            record(index, status, time.perf_counter() - due, answer)
            idle.append(conn)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            result.first_error = result.first_error or f"connection error: {type(exc).__name__}: {exc}"
            record(index, -2, float("nan"), None)
            await conn.close()
        finally:
            inflight -= 1

    t0 = time.perf_counter()
    for index, (at, phase, image) in enumerate(arrivals):
        result.scheduled_s.append(at)
        result.phase.append(phase)
        result.image.append(image)
        result.status.append(-2)
        result.latency_s.append(float("nan"))
        result.label.append(-1)
        result.exit.append(-1)
        result.macs.append(float("nan"))
        result.degraded.append(False)
        result.allowed_drop.append(float("nan"))
        result.new_connection.append(False)
        due = t0 + at
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        result.send_lag_s.append(max(0.0, time.perf_counter() - due))
        if inflight >= max_connections:
            result.status[index] = -1
            continue
        inflight += 1
        task = asyncio.create_task(one(index, requests[image], due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout_s)
    for conn in idle:
        await conn.close()
    return result
