"""Cross-request, per-stage batching of early-exit inference on one ONNX Runtime worker thread.

Why a scheduler and not `Engine.classify` per request: concurrent requests should share stage
runs (a batch of 16 costs far less than 16 batches of 1 on a GPU, and never more on a CPU), and
the survivors of *different* requests and batches should be merged before the deeper, more
expensive stages, instead of each request dragging its own shrinking batch through the network.

Design
------
* Work unit: a `_Chunk` = some rows of one request at one stage: the request, the row indices
  (n,), the rows' state (`StageBatch`, batch-first arrays) and where the rows came from (the
  request for stage 0, the producing batch for deeper stages; used for the merge statistics).
  One queue (deque of chunks) per stage. Per-row work is numpy on whole chunks/batches: batches are
  built with one `np.concatenate` per state key, exits are one vectorised comparison, survivors
  are one `take` per batch; the only per-row Python is building each exiting row's `ExitResult`.
  The observer hears of a batch's exits in one call (an array of confidences), not one per image.
* Picking the next batch (event loop, whenever the worker is free):
    1. deeper stages go first, so admitted work finishes and frees memory/latency: the deepest
       non-empty stage k > 0 runs, *unless* stage 0 holds a full batch (the server is loaded); then
       stage k waits (at most `merge_wait_ms` after its oldest chunk arrived, or until it is full)
       to collect survivors of several stage-0 batches into one fuller stage-k batch;
    2. stage 0 runs when it has `max_batch_size` rows or its oldest row waited `max_wait_ms`;
    3. otherwise the dispatcher sleeps until the oldest stage-0 row's wait ends or a submit wakes it.
  A batch takes whole chunks front to back (the last one is split when it does not fit), so
  requests are served FIFO within a stage and a batch mixes rows of many requests.
* Execution: ONE dedicated worker thread (`ThreadPoolExecutor(max_workers=1)`) runs the
  concatenation, the ONNX Runtime stage, the softmax and the exit test for one batch at a time;
  the event loop only does the bookkeeping, so HTTP keeps flowing while a stage runs (2 cores: one
  for ORT, one for the loop; see service.core.engine for the thread measurement). Requests and queues
  are touched only on the event loop thread, so there are no locks.
  `run_on_loop=True` runs the batch on the event loop instead (then yields once): with a single
  CPU there is no parallelism for the thread to buy, only a GIL hand-off and a cross-thread wake-up
  per batch (measured in docs/benchmarks.md); the server picks it when it may use one CPU.
* Thresholds travel with each request ((B, E), the per-request budget); `early_exit=False` uses
  +inf for every stage but the last. Exits follow service.core.exit_rule (conf = max softmax(F_k)
  >= T[k]; the last always answers).
* Deadlines (absolute `time.monotonic()`): a loop timer fires at the deadline; rows that have not
  exited answer with their latest F (deadline_hit=True) if they finished at least stage 0; if any
  row of the request has not, the request fails with DeadlineExceededError. The request's queued
  chunks are dropped; rows in the running batch are ignored when it returns. The engine's current
  ORT run is not interrupted (ORT cannot be), so the worker may stay busy for one batch.
* Request timeout (`request_timeout_s`, the server's safety net, seconds from admission): one
  sweeper task fails requests older than that with DeadlineExceededError, up to a quarter of the
  timeout (at most 0.25 s) late. Why not a timer per request: at thousands of requests per second
  an `asyncio.timeout` around every submit was ~4 % of the server's CPU; admission order is
  the dict order of the pending requests, so a sweep stops at the first young one.
* Backpressure: `max_queue` bounds the images admitted and not yet answered (queued + running).
  A submit that would exceed it fails at once with OverCapacityError(retry_after = estimated drain
  time), except into an empty scheduler (a request larger than max_queue is still served alone).
* Failures: an exception from a stage run fails exactly the requests with rows in that batch
  (StageFailedError); their other queued rows are dropped; everything else keeps going.
* `batching=False`: no waiting and a batch holds rows of a single request (each request's images
  alone; with one image per request this is batch-1 serving, for benchmarks). Deeper-first still
  applies, so a request finishes before the next one starts.
* Shutdown: `stop(drain=True)` refuses new work (NotReadyError), finishes admitted work within
  `timeout`, then fails whatever is left with NotReadyError.

Observer calls (`SchedulerObserver`, implemented by service.http.metrics) come from the event loop;
stages are 0-based (metrics label them 1..N). Queue depths are not pushed: readers call
`queue_depths()` (metrics read it at scrape time).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.core.engine import Engine, ExitResult, StageBatch, make_result, normalize_thresholds
from service.core.errors import (
    BoostServeError,
    DeadlineExceededError,
    NotReadyError,
    OverCapacityError,
    StageFailedError,
)
from service.core.exit_rule import confidence, exits, softmax

LOG = logging.getLogger("boostserve.scheduler")


class SchedulerObserver(Protocol):
    """Receives scheduler events on the event loop thread; stage indices are 0-based."""

    def on_stage_batch(self, stage: int, batch_size: int, seconds: float) -> None: ...

    def on_exits(self, stage: int, confidences: np.ndarray, macs: float, deadline_hit: bool) -> None:
        """Images answered at `stage`, all at once: (n,) max-softmax values, each at `macs` MACs."""
        ...


@dataclass
class StageStats:
    """Counters of one stage since start()."""

    batches: int = 0
    items: int = 0
    seconds: float = 0.0
    failed_batches: int = 0
    max_batch: int = 0
    multi_request_batches: int = 0  # batches holding rows of >= 2 requests
    merged_batches: int = 0  # batches combining >= 2 sources (stage 0: submits; k > 0: upstream batches)
    merged_items: int = 0  # items in merged batches


@dataclass(frozen=True)
class BatchRecord:
    """One executed batch, kept in a bounded log (tests and debugging)."""

    batch_id: int
    stage: int
    size: int
    requests: int
    sources: int
    exits: int


@dataclass
class SchedulerStats:
    stages: list[StageStats]
    submitted: int = 0
    completed: int = 0
    rejected: int = 0  # over capacity
    failed: int = 0  # stage failures
    deadline_hits: int = 0  # images answered best-so-far
    deadline_exceeded: int = 0  # requests with no answer by their deadline
    timed_out: int = 0  # requests failed by the request timeout
    cancelled: int = 0
    recent_batches: deque[BatchRecord] = field(default_factory=lambda: deque(maxlen=1024))


class _Request:
    """One submit: its images' thresholds, answers so far and the future its caller awaits."""

    __slots__ = (
        "best_exit",
        "best_logits",
        "deadline",
        "done",
        "expires",
        "future",
        "id",
        "queued_chunks",
        "remaining",
        "results",
        "size",
        "thresholds",
        "timer",
    )

    def __init__(
        self,
        rid: int,
        size: int,
        thresholds: np.ndarray,
        deadline: float | None,
        future: asyncio.Future[list[ExitResult]],
    ) -> None:
        self.id = rid
        self.size = size
        self.thresholds = thresholds  # (B, E) float32
        self.deadline = deadline
        self.future = future
        self.results: list[ExitResult | None] = [None] * size
        self.remaining = size
        self.done = False
        self.queued_chunks = 0  # chunks of this request in the queues (finalize scans only if > 0)
        self.expires = math.inf  # loop.time() when the request timeout fails it
        self.timer: asyncio.TimerHandle | None = None
        # Best-so-far F per row, kept only for requests with a deadline: (B, classes), exit (B,).
        self.best_logits: np.ndarray | None = None
        self.best_exit: np.ndarray | None = None


class _Chunk:
    """Rows of one request waiting at one stage."""

    __slots__ = ("enqueued", "request", "rows", "source", "state", "whole")

    def __init__(
        self, request: _Request, rows: np.ndarray, state: StageBatch, source: int, enqueued: float, whole: bool = False
    ) -> None:
        self.request = request
        self.rows = rows  # (n,) int64 indices into the request
        self.state = state  # n rows
        self.source = source
        self.enqueued = enqueued  # loop.time()
        self.whole = whole  # rows == arange(request.size): per-row lookups can slice instead of gather

    def thresholds(self, k: int) -> np.ndarray:
        """(n,) the rows' thresholds at stage k."""
        table = self.request.thresholds  # (B, E)
        return table[:, k] if self.whole else table[self.rows, k]


@dataclass
class _Computed:
    """Worker-thread result of one batch."""

    logits: np.ndarray  # (n, classes)
    probs: np.ndarray  # (n, classes)
    conf: np.ndarray  # (n,)
    leave: np.ndarray  # (n,) bool
    next_state: StageBatch | None  # m rows, None when nobody survives
    seconds: float


class Scheduler:
    """Asyncio front of an `Engine`: per-stage queues, cross-request batches, deadlines, backpressure."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
        batching: bool = True,
        observer: SchedulerObserver | None = None,
        merge_wait_ms: float | None = None,
        log: logging.Logger | None = None,
        run_on_loop: bool = False,
        request_timeout_s: float | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        self.engine = engine
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.merge_wait = self.max_wait if merge_wait_ms is None else float(merge_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.batching = bool(batching)
        self.run_on_loop = bool(run_on_loop)
        self.request_timeout = None if request_timeout_s is None else float(request_timeout_s)
        self.observer = observer
        self.log = log or LOG
        self.num_stages = engine.num_stages
        self._cum_macs = [int(m) for m in engine.cumulative_macs]
        self._queues: list[deque[_Chunk]] = [deque() for _ in range(self.num_stages)]
        self._depth = [0] * self.num_stages
        self._pending = 0  # images admitted and not yet answered
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self._accepting = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seconds_per_image = 0.0  # EMA of worker seconds per admitted image (retry_after)
        self.stats = SchedulerStats(stages=[StageStats() for _ in range(self.num_stages)])

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._accepting

    async def start(self) -> None:
        """Start the dispatcher task and, unless batches run on the loop, the ORT worker thread
        (call from the serving event loop)."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        if not self.run_on_loop:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="boostserve-ort")
        self._closing = False
        self._accepting = True
        self._task = asyncio.create_task(self._dispatch(), name="boostserve-scheduler")
        if self.request_timeout is not None:
            self._sweeper = asyncio.create_task(self._sweep(self.request_timeout), name="boostserve-timeouts")

    async def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Refuse new work; with drain, finish admitted work (up to timeout) first; fail the rest."""
        self._accepting = False
        task = self._task
        if task is None:
            return
        self._closing = True
        self._wake()
        deadline = time.monotonic() + max(0.0, timeout)
        if drain:
            await asyncio.wait({task}, timeout=max(0.0, timeout))
        if not task.done():
            self._fail_all(NotReadyError("the server is shutting down"))
            self._wake()
            await asyncio.wait({task}, timeout=max(0.1, deadline - time.monotonic()))
            if not task.done():
                task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._task = None
        self._executor = None

    def queue_depths(self) -> list[int]:
        """Images waiting per stage (running batches excluded)."""
        return list(self._depth)

    @property
    def pending(self) -> int:
        """Images admitted and not yet answered (queued + running): what max_queue bounds."""
        return self._pending

    # -- submit --------------------------------------------------------------------------------------

    async def submit(
        self,
        images: Any,
        thresholds: Any = None,
        *,
        early_exit: bool = True,
        deadline: float | None = None,
    ) -> list[ExitResult]:
        """Classify (B, C, H, W) images; results in input order.

        thresholds: (E,) or (B, E) (None or early_exit=False: every stage). deadline: absolute
        time.monotonic(). Raises NotReadyError, OverCapacityError, ValidationFailedError,
        DeadlineExceededError, StageFailedError.
        """
        if not self._accepting or self._loop is None:
            raise NotReadyError("the scheduler is not running")
        arr = self.engine.check_images(images)
        n = int(arr.shape[0])
        if n == 0:
            return []
        thr = normalize_thresholds(thresholds if early_exit else None, n, self.num_stages)  # (B, E)
        if deadline is not None and time.monotonic() >= deadline:
            self.stats.deadline_exceeded += 1
            raise DeadlineExceededError("the deadline passed before the request was queued")
        if self._pending > 0 and self._pending + n > self.max_queue:
            self.stats.rejected += 1
            raise OverCapacityError(
                f"{self._pending} images are queued (limit {self.max_queue}); retry later",
                retry_after=self._retry_after(),
            )
        loop = self._loop
        req = _Request(next(self._ids), n, thr, deadline, loop.create_future())
        if self.request_timeout is not None:
            req.expires = loop.time() + self.request_timeout
        if deadline is not None:
            req.best_logits = np.zeros((n, self.engine.num_classes), dtype=np.float32)
            req.best_exit = np.full(n, -1, dtype=np.int32)
            req.timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._expire, req)
        self._requests[req.id] = req
        self._pending += n
        self.stats.submitted += 1
        self._enqueue(0, _Chunk(req, np.arange(n), self.engine.initial_state(arr), req.id, loop.time(), whole=True))
        self._wake()
        try:
            return await req.future
        except asyncio.CancelledError:
            if not req.done:  # the caller went away (client disconnect): drop its queued rows
                self.stats.cancelled += 1
                self._finalize(req)
            raise

    # -- queues --------------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _enqueue(self, k: int, chunk: _Chunk) -> None:
        self._queues[k].append(chunk)
        chunk.request.queued_chunks += 1
        self._depth[k] += len(chunk.rows)

    def _pick(self, now: float) -> tuple[int | None, float | None]:
        """(stage to run, None) or (None, seconds to sleep; None = until woken). See module docstring."""
        depth = self._depth
        if not self.batching or self._closing:
            for k in range(self.num_stages - 1, -1, -1):
                if depth[k] > 0:
                    return k, None
            return None, None
        full0 = depth[0] >= self.max_batch_size
        sleep: float | None = None
        for k in range(self.num_stages - 1, 0, -1):
            if depth[k] == 0:
                continue
            if not full0 or depth[k] >= self.max_batch_size:
                return k, None
            ready_at = self._queues[k][0].enqueued + self.merge_wait
            if now >= ready_at:
                return k, None
            sleep = ready_at - now if sleep is None else min(sleep, ready_at - now)
        if depth[0] > 0:
            ready_at = self._queues[0][0].enqueued + self.max_wait
            if full0 or now >= ready_at:
                return 0, None
            sleep = ready_at - now if sleep is None else min(sleep, ready_at - now)
        return None, sleep

    def _take_batch(self, k: int) -> list[_Chunk]:
        """Whole chunks front to back up to max_batch_size rows; the last one may be split."""
        queue = self._queues[k]
        chunks: list[_Chunk] = []
        room = self.max_batch_size
        while queue and room > 0:
            head = queue[0]
            if head.request.done:  # defensive: finalize removes them
                queue.popleft()
                head.request.queued_chunks -= 1
                self._depth[k] -= len(head.rows)
                continue
            if not self.batching and chunks and head.request is not chunks[0].request:
                break
            n = len(head.rows)
            if n <= room:
                queue.popleft()
                head.request.queued_chunks -= 1
                chunks.append(head)
                room -= n
            else:
                part = _Chunk(
                    head.request,
                    head.rows[:room],
                    head.state.take(slice(0, room)),
                    head.source,
                    head.enqueued,
                )
                head.rows = head.rows[room:]
                head.whole = False
                head.state = head.state.take(slice(room, None))
                chunks.append(part)
                room = 0
        self._depth[k] -= self.max_batch_size - room
        return chunks

    # -- dispatcher ----------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        loop = self._loop
        while True:
            k, sleep = self._pick(loop.time())
            if k is None:
                if self._closing and sum(self._depth) == 0:
                    return
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(sleep):  # no extra task, unlike wait_for
                        await self._wakeup.wait()
                continue
            chunks = self._take_batch(k)
            if not chunks:
                continue
            try:
                await self._execute(k, chunks)
                if self.run_on_loop:
                    await asyncio.sleep(0)  # the batch ran on the loop: let HTTP I/O in before the next
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in the bookkeeping must not kill the dispatcher
                self.log.exception("scheduler batch at stage %d failed", k + 1)
                err = StageFailedError(f"internal error at stage {k + 1}: {type(exc).__name__}")
                for req in {id(c.request): c.request for c in chunks}.values():
                    self._fail(req, err)

    def _compute(self, k: int, states: list[StageBatch], thr: np.ndarray | None) -> _Computed:
        """Worker thread: concatenate, run stage k, softmax, exit test, compact survivors."""
        state = StageBatch.concat(states)  # (n, ...) per key
        out = self.engine.run_stage_batch(k, state)
        logits = np.asarray(out.logits, dtype=np.float32)  # (n, classes)
        probs = softmax(logits)  # (n, classes)
        conf = confidence(probs)  # (n,)
        leave = np.ones(conf.shape, dtype=bool) if thr is None else exits(conf, thr)
        stay = np.flatnonzero(~leave)
        if stay.size == 0:
            next_state = None
        elif stay.size == state.size:
            next_state = out.state  # nobody left: pass through (device values stay on the device)
        else:
            next_state = out.state.take(stay)
        return _Computed(logits, probs, conf, leave, next_state, out.seconds)

    async def _execute(self, k: int, chunks: list[_Chunk]) -> None:
        assert self._loop is not None
        last = k == self.num_stages - 1
        thr = None if last else np.concatenate([c.thresholds(k) for c in chunks])  # (n,)
        size = sum(len(c.rows) for c in chunks)
        batch_id = next(self._batch_ids)
        st = self.stats.stages[k]
        try:
            if self._executor is None:  # run_on_loop: no worker thread was started
                comp = self._compute(k, [c.state for c in chunks], thr)
            else:
                comp = await self._loop.run_in_executor(
                    self._executor, self._compute, k, [c.state for c in chunks], thr
                )
        except Exception as exc:
            st.failed_batches += 1
            message = exc.message if isinstance(exc, BoostServeError) else f"{type(exc).__name__}: {exc}"
            self.log.error("stage %d batch of %d failed: %s", k + 1, size, message)
            err = StageFailedError(message)
            for req in {id(c.request): c.request for c in chunks}.values():
                self.stats.failed += 1
                self._fail(req, err)
            return

        # Statistics and observer.
        requests = len({id(c.request) for c in chunks})
        sources = len({c.source for c in chunks})
        st.batches += 1
        st.items += size
        st.seconds += comp.seconds
        st.max_batch = max(st.max_batch, size)
        if requests > 1:
            st.multi_request_batches += 1
        if sources > 1:
            st.merged_batches += 1
            st.merged_items += size
        # Worker seconds (all stages) per image admitted at stage 0: the drain-time estimate.
        self._seconds_per_image = sum(s.seconds for s in self.stats.stages) / max(1, self.stats.stages[0].items)
        exits = int(comp.leave.sum())
        self.stats.recent_batches.append(BatchRecord(batch_id, k, size, requests, sources, exits))
        if self.observer is not None:
            self._safe(self.observer.on_stage_batch, k, size, comp.seconds)

        # Distribute: exits answer their rows, survivors go to stage k+1 as one chunk per request segment.
        # Per-row decisions as Python lists, one conversion per batch: most chunks hold one image,
        # and numpy calls on 1-element slices cost more than the work (measured in a profile).
        macs = self._cum_macs[k]
        now = self._loop.time()
        leave: list[bool] = comp.leave.tolist()
        conf: list[float] = comp.conf.tolist()
        answered: list[int] = []  # batch positions whose answer reached a live request
        start = 0
        kept = 0  # survivors so far = where the next chunk's survivors start in comp.next_state
        for chunk in chunks:
            n = len(chunk.rows)
            end = start + n
            exiting = [i for i in range(n) if leave[start + i]]
            n_stay = n - len(exiting)
            req = chunk.request
            if req.done:  # deadline/failure/cancel while this batch ran
                start, kept = end, kept + n_stay
                continue
            if exiting:
                rows = chunk.rows.tolist()
                for i in exiting:
                    j = start + i
                    req.results[rows[i]] = make_result(k, comp.logits[j], comp.probs[j], conf[j], macs)
                    answered.append(j)
                req.remaining -= len(exiting)
            if n_stay:
                assert comp.next_state is not None
                stays = ~comp.leave[start:end]  # (n,)
                keep_rows = chunk.rows if not exiting else chunk.rows[stays]  # (m,)
                if req.best_logits is not None and req.best_exit is not None:
                    req.best_logits[keep_rows] = comp.logits[start:end][stays]
                    req.best_exit[keep_rows] = k
                state = (
                    comp.next_state
                    if n_stay == comp.next_state.size
                    else comp.next_state.take(slice(kept, kept + n_stay))
                )
                self._enqueue(k + 1, _Chunk(req, keep_rows, state, batch_id, now, whole=chunk.whole and not exiting))
                kept += n_stay
            if req.remaining == 0:
                self._complete(req)
            start = end
        if answered and self.observer is not None:
            self._safe(self.observer.on_exits, k, comp.conf[answered], float(macs), False)

    # -- request endings -----------------------------------------------------------------------------

    def _finalize(self, req: _Request) -> None:
        """Mark done, stop its timer, drop its queued rows, release its admission."""
        if req.done:
            return
        req.done = True
        if req.timer is not None:
            req.timer.cancel()
        if req.queued_chunks > 0:  # rare: deadline, failure, cancel or shutdown with rows still queued
            for k, queue in enumerate(self._queues):
                if any(c.request is req for c in queue):
                    kept = [c for c in queue if c.request is not req]
                    self._depth[k] = sum(len(c.rows) for c in kept)
                    self._queues[k] = deque(kept)
            req.queued_chunks = 0
        self._pending -= req.size
        self._requests.pop(req.id, None)

    def _complete(self, req: _Request) -> None:
        self._finalize(req)
        self.stats.completed += 1
        if not req.future.done():
            req.future.set_result([r for r in req.results if r is not None])

    def _fail(self, req: _Request, exc: BaseException) -> None:
        self._finalize(req)
        if not req.future.done():
            req.future.set_exception(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for req in list(self._requests.values()):
            self._fail(req, exc)

    def _expire(self, req: _Request) -> None:
        """Deadline timer: best-so-far answers, or DeadlineExceededError if a row has no exit yet."""
        if req.done:
            return
        assert req.best_exit is not None and req.best_logits is not None
        missing = [i for i, r in enumerate(req.results) if r is None]
        if any(int(req.best_exit[i]) < 0 for i in missing):
            self.stats.deadline_exceeded += 1
            self._fail(req, DeadlineExceededError("the deadline passed before the first exit answered"))
            return
        idx = np.asarray(missing, dtype=np.int64)
        logits = req.best_logits[idx]  # (m, classes)
        probs = softmax(logits)  # (m, classes)
        conf = confidence(probs)  # (m,)
        stages = req.best_exit[idx]  # (m,)
        for pos, i in enumerate(missing):
            stage = int(stages[pos])
            req.results[i] = make_result(stage, logits[pos], probs[pos], conf[pos], self._cum_macs[stage], True)
        if self.observer is not None:
            for stage in np.unique(stages).tolist():
                self._safe(self.observer.on_exits, stage, conf[stages == stage], float(self._cum_macs[stage]), True)
        self.stats.deadline_hits += len(missing)
        req.remaining = 0
        self._complete(req)

    async def _sweep(self, timeout: float) -> None:
        """Fail the requests admitted more than `timeout` seconds ago (see the module docstring)."""
        assert self._loop is not None
        while True:
            await asyncio.sleep(min(0.25, timeout / 4))
            now = self._loop.time()
            expired: list[_Request] = []
            for req in self._requests.values():  # admission order
                if req.expires > now:
                    break
                expired.append(req)
            for req in expired:
                self.stats.timed_out += 1
                self._fail(req, DeadlineExceededError(f"no answer within the request timeout of {timeout:g} s"))

    # -- helpers -------------------------------------------------------------------------------------

    def _retry_after(self) -> float:
        """Seconds until the current backlog should have drained (0.1 .. 30; 1 without data)."""
        if self._seconds_per_image <= 0.0:
            return 1.0
        return float(min(30.0, max(0.1, math.ceil(self._pending * self._seconds_per_image * 10) / 10)))

    def _safe(self, fn: Callable[..., None], *args: Any) -> None:
        """Observer failures are logged, never allowed to break serving."""
        try:
            fn(*args)
        except Exception:
            self.log.exception("scheduler observer %s failed", getattr(fn, "__name__", fn))
