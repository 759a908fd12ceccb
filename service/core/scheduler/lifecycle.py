"""The scheduler's asyncio side: start/stop, submit, the dispatcher, batch execution, request
endings (answers, failures, deadlines, the request-timeout sweeper).

The design is described in the package docstring (service/core/scheduler/__init__.py); which stage
runs next and which chunks form its batch is decided by the pure functions of `.policy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

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
from service.core.scheduler.policy import BatchingSettings, Pick, pick_stage, plan_batch
from service.core.scheduler.shadow import ShadowItem, ShadowQueues, ShadowSink
from service.core.scheduler.stats import SchedulerObserver, SchedulerStats, StageStats
from service.core.scheduler.work import Chunk, Computed, RequestState

LOG = logging.getLogger("boostserve.scheduler")


@dataclass(frozen=True, slots=True)
class _Delivery:
    """One computed batch on its way back to its requests (event loop side).

    The per-row decisions are Python lists, converted once per batch: most chunks hold one image,
    and numpy calls on 1-element slices cost more than the work (measured in a profile).
    """

    stage: int
    comp: Computed
    leave: list[bool]  # comp.leave
    conf: list[float]  # comp.conf
    macs: int  # cumulative MACs of the stage
    source: int  # the batch id: the source of the survivors' chunks
    now: float  # loop.time(): when the survivors are queued


#: How much nicer than the event loop the ORT worker thread runs when the loop shares its one CPU
#: (`inline_max_ms` > 0): when both want the core, the loop (every connection, the liveness probe,
#: deadline timers) goes first and the stage batch runs in what is left; decode workers are nicer
#: still (core.decode_worker).
ORT_THREAD_NICENESS = 5


def _lower_priority() -> None:
    """Worker-thread initializer: Linux schedules threads, so the niceness is this thread's own
    (relative to the loop's, which it inherited: raising it needs no privilege)."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + ORT_THREAD_NICENESS))


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
        inline_max_ms: float = 0.0,
        request_timeout_s: float | None = None,
        shadow_fraction: float = 0.0,
        shadow_sink: ShadowSink | None = None,
        shadow_seed: int | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        if not 0.0 <= shadow_fraction <= 1.0:  # also NaN
            raise ValueError(f"shadow_fraction must be in [0, 1], got {shadow_fraction!r}")
        if not 0.0 <= inline_max_ms < math.inf:  # also NaN
            raise ValueError(f"inline_max_ms must be finite and >= 0, got {inline_max_ms!r}")
        self.engine = engine
        max_wait = float(max_wait_ms) / 1000.0
        self.settings = BatchingSettings(
            max_batch_size=int(max_batch_size),
            max_wait=max_wait,
            merge_wait=max_wait if merge_wait_ms is None else float(merge_wait_ms) / 1000.0,
            batching=bool(batching),
        )
        self.max_queue = int(max_queue)
        self.run_on_loop = bool(run_on_loop)
        #: With the worker thread: a batch predicted to take at most this long runs on the loop.
        self.inline_max_s = 0.0 if run_on_loop else float(inline_max_ms) / 1000.0
        self.request_timeout = None if request_timeout_s is None else float(request_timeout_s)
        self.observer = observer
        self.log = log or LOG
        self.num_stages = engine.num_stages
        self._cum_macs = [int(m) for m in engine.cumulative_macs]
        self._queues: list[deque[Chunk]] = [deque() for _ in range(self.num_stages)]
        self._depth = [0] * self.num_stages
        self._pending = 0  # images admitted and not yet answered
        self._requests: dict[int, RequestState] = {}
        self._ids = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self._accepting = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = SchedulerStats(stages=[StageStats() for _ in range(self.num_stages)])
        # Shadow work (see .shadow): sampled early exits run to the last stage when the worker is idle.
        self.shadow_fraction = float(shadow_fraction)
        self.shadow_sink = shadow_sink if shadow_fraction > 0.0 else None
        self._shadow = ShadowQueues(self.num_stages)
        self._shadow_rng = np.random.default_rng(shadow_seed)

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._accepting

    def execution_summary(self) -> str:
        """Where stage batches run, in words (the start-up log line)."""
        if self.run_on_loop:
            return "on the event loop"
        if self.inline_max_s > 0.0:
            return f"on the event loop up to {self.inline_max_s * 1e3:g} ms predicted, longer on the ORT worker thread"
        return "on the ORT worker thread"

    async def start(self) -> None:
        """Start the dispatcher task and, unless batches run on the loop, the ORT worker thread
        (call from the serving event loop)."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        if not self.run_on_loop:
            self._executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="boostserve-ort",
                initializer=_lower_priority if self.inline_max_s > 0.0 else None,
            )
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

    def queue_delay(self) -> float:
        """Seconds the longest-waiting queued chunk has waited (0 with empty queues): the queueing
        signal of SLO mode (`service.core.live.slo`). Read per control tick, one look per stage."""
        if self._loop is None:
            return 0.0
        oldest = [queue[0].enqueued for queue in self._queues if queue]
        return max(0.0, self._loop.time() - min(oldest)) if oldest else 0.0

    @property
    def pending(self) -> int:
        """Images admitted and not yet answered (queued + running): what max_queue bounds."""
        return self._pending

    # -- submit --------------------------------------------------------------------------------------

    def admit(self, n: int) -> None:
        """Would `n` more images be admitted now? Raises NotReadyError / OverCapacityError if not.

        The one admission rule: `submit` applies it, and callers apply it before the expensive work
        that precedes a submit (decoding), so a request that will be refused costs no decode. Into
        an empty scheduler every request is admitted (one larger than max_queue is served alone).
        """
        if not self._accepting or self._loop is None:
            raise NotReadyError("the scheduler is not running")
        if self._pending > 0 and self._pending + n > self.max_queue:
            self.stats.rejected += 1
            raise OverCapacityError(
                f"{self._pending} images are queued (limit {self.max_queue}); retry later",
                retry_after=self.stats.drain_seconds(self._pending),
            )

    async def submit(
        self,
        images: Any,
        thresholds: Any = None,
        *,
        early_exit: bool = True,
        deadline: float | None = None,
        started: float | None = None,
        shadow: object | None = None,
    ) -> list[ExitResult]:
        """Classify (B, C, H, W) images; results in input order.

        thresholds: (E,) or (B, E) (None or early_exit=False: every stage). deadline: absolute
        time.monotonic(); a deadline never fails the request, even one already passed (see the
        package docstring). Raises NotReadyError, OverCapacityError, ValidationFailedError,
        DeadlineExceededError (the request timeout only), StageFailedError. started: the request's
        arrival (time.monotonic()), so the request timeout counts its decode too (default: now).
        shadow: a tag (the thresholds in force) making the request's early exits eligible for
        shadow sampling (.shadow); None: never sampled.
        """
        arr = self.engine.check_images(images)
        n = int(arr.shape[0])
        self.admit(n)
        if n == 0:
            return []
        thr = normalize_thresholds(thresholds if early_exit else None, n, self.num_stages)  # (B, E)
        loop = self._loop
        assert loop is not None  # admit() refuses while the scheduler is not running
        req = RequestState(next(self._ids), n, thr, deadline, loop.create_future())
        if early_exit and self.shadow_sink is not None:
            req.shadow = shadow
        if self.request_timeout is not None:
            req.expires = (loop.time() if started is None else started) + self.request_timeout
        if deadline is not None:
            req.best_logits = np.zeros((n, self.engine.num_classes), dtype=np.float32)
            req.best_exit = np.full(n, -1, dtype=np.int32)
            left = deadline - time.monotonic()
            if left > 0.0:
                req.timer = loop.call_later(left, self._expire, req)
            else:  # already passed (a tiny deadline_ms): stage 1 answers every row, no timer
                req.late = True
                self.stats.deadline_late += 1
        self._requests[req.id] = req
        self._pending += n
        self._enqueue(0, Chunk(req, np.arange(n), self.engine.initial_state(arr), req.id, loop.time(), whole=True))
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

    def _enqueue(self, k: int, chunk: Chunk) -> None:
        self._queues[k].append(chunk)
        chunk.request.queued_chunks += 1
        self._depth[k] += len(chunk.rows)

    def _pick(self, now: float) -> Pick:
        """`policy.pick_stage` on the current queues."""
        oldest = [queue[0].enqueued if queue else 0.0 for queue in self._queues]
        return pick_stage(self._depth, oldest, now, self.settings, closing=self._closing)

    def _take_batch(self, k: int) -> list[Chunk]:
        """Pop the chunks `policy.plan_batch` chooses from stage k's queue, splitting the last."""
        queue = self._queues[k]
        plan = plan_batch(((len(c.rows), c.request.id) for c in queue), self.settings)
        chunks = [queue.popleft() for _ in range(plan.whole)]
        for chunk in chunks:
            chunk.request.queued_chunks -= 1
        if plan.split:
            chunks.append(queue[0].split_front(plan.split))
        self._depth[k] -= plan.rows
        return chunks

    # -- dispatcher ----------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        loop = self._loop
        while True:
            k, sleep = self._pick(loop.time())
            if k is None:
                if self._closing and sum(self._depth) == 0:
                    self._drop_shadow()
                    return
                if self._shadow.rows and not self._closing and sum(self._depth) == 0:
                    if await self._run_shadow():  # the worker would idle: spare capacity
                        await asyncio.sleep(0)  # it ran on the loop: let HTTP I/O in
                    continue
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(sleep):  # no extra task, unlike wait_for
                        await self._wakeup.wait()
                continue
            chunks = self._take_batch(k)  # not empty: stage k holds rows
            try:
                if await self._execute(k, chunks):
                    await asyncio.sleep(0)  # the batch ran on the loop: let HTTP I/O in before the next
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in the bookkeeping must not kill the dispatcher
                self.log.exception("scheduler batch at stage %d failed", k + 1)
                err = StageFailedError(f"internal error at stage {k + 1}: {type(exc).__name__}")
                for req in {id(c.request): c.request for c in chunks}.values():
                    self._fail(req, err)

    def _compute(
        self, k: int, states: list[StageBatch], thr: np.ndarray | None, drawn: np.ndarray | None = None
    ) -> Computed:
        """Worker thread: concatenate, run stage k, softmax, exit test, compact survivors; keep the
        next-stage state of the rows `drawn` for shadow work that exit here."""
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
        comp = Computed(logits, probs, conf, leave, next_state, out.seconds)
        if drawn is not None:
            sampled = np.flatnonzero(drawn & leave)  # (s,)
            if sampled.size:
                comp.shadow_rows, comp.shadow_state = sampled, out.state.take(sampled)
        return comp

    def _runs_inline(self, k: int, size: int) -> bool:
        """Run a batch of `size` rows at stage k on the loop? Always without a worker thread; with
        one, when stage k's mean seconds per row so far predict at most `inline_max_s` (a stage not
        yet measured goes to the thread). Why: on one CPU the hand-off to the thread costs more than
        a small batch itself, while a long batch on the loop holds every connection, probe and
        deadline timer for its whole run."""
        if self._executor is None:
            return True
        st = self.stats.stages[k]
        return st.items > 0 and size * (st.seconds / st.items) <= self.inline_max_s

    async def _execute(self, k: int, chunks: list[Chunk]) -> bool:
        """Run one batch of stage k, then answer its exits and queue its survivors at stage k + 1;
        True when it ran on the loop."""
        size = sum(len(c.rows) for c in chunks)
        inline = self._runs_inline(k, size)
        comp = await self._run_batch(k, chunks, size, inline)
        if comp is not None:
            self._record_batch(k, chunks, size, comp)
            self._distribute(k, chunks, comp, next(self._batch_ids))
        return inline

    async def _run_batch(self, k: int, chunks: list[Chunk], size: int, inline: bool) -> Computed | None:
        """`_compute` on the loop (inline) or the worker thread; None when it failed (its requests
        are failed)."""
        assert self._loop is not None
        last = k == self.num_stages - 1
        thr = None if last else np.concatenate([c.thresholds(k) for c in chunks])  # (n,)
        states = [c.state for c in chunks]
        drawn = None if last else self._draw_shadow(chunks, size)
        try:
            if inline:
                return self._compute(k, states, thr, drawn)
            return await self._loop.run_in_executor(self._executor, self._compute, k, states, thr, drawn)
        except Exception as exc:
            self._fail_batch(k, chunks, size, exc)
            return None

    def _fail_batch(self, k: int, chunks: list[Chunk], size: int, exc: Exception) -> None:
        """A stage run raised: fail exactly the requests with rows in this batch."""
        self.stats.stages[k].failed_batches += 1
        message = exc.message if isinstance(exc, BoostServeError) else f"{type(exc).__name__}: {exc}"
        self.log.error("stage %d batch of %d failed: %s", k + 1, size, message)
        err = StageFailedError(message)
        for req in {id(c.request): c.request for c in chunks}.values():
            self.stats.failed += 1
            self._fail(req, err)

    def _record_batch(self, k: int, chunks: list[Chunk], size: int, comp: Computed) -> None:
        """Statistics and the observer's per-batch event (with how many requests and sources merged)."""
        self.stats.record_batch(k, size, comp.seconds)
        if self.observer is not None:
            requests = len({id(c.request) for c in chunks})
            sources = len({c.source for c in chunks})
            self._safe(self.observer.on_stage_batch, k, size, comp.seconds, requests, sources)

    def _distribute(self, k: int, chunks: list[Chunk], comp: Computed, batch_id: int) -> None:
        """Exits answer their rows; survivors go to stage k+1 as one chunk per request segment."""
        assert self._loop is not None
        out = _Delivery(
            k, comp, comp.leave.tolist(), comp.conf.tolist(), self._cum_macs[k], batch_id, self._loop.time()
        )
        answered: list[int] = []  # batch positions whose answer reached a live request
        eligible: list[tuple[object, int, list[int]]] = []  # per shadow-eligible chunk: tag, exits, positions
        late_rows: list[int] = []  # batch positions answered because their request's deadline passed
        start = 0
        kept = 0  # survivors so far = where the next chunk's survivors start in comp.next_state
        for chunk in chunks:
            n = len(chunk.rows)
            exiting = [i for i in range(n) if out.leave[start + i]]
            n_stay = n - len(exiting)
            req = chunk.request
            if req.late and not req.done:
                if k == 0:  # the deadline passed before these rows had an exit: this one answers
                    late_rows += self._answer_late(out, chunk, start)
                    if req.remaining == 0:
                        self._complete(req)
                # deeper (k > 0): these rows were answered best-so-far when the deadline fired
            elif not req.done:  # else a deadline, failure or cancel ended it while this batch ran
                if exiting:
                    positions = self._answer(out, chunk, exiting, start)
                    answered += positions
                    if req.shadow is not None:
                        eligible.append((req.shadow, len(exiting), positions))
                if n_stay:
                    self._forward(out, chunk, start, bool(exiting), slice(kept, kept + n_stay))
                if req.remaining == 0:
                    self._complete(req)
            start += n
            kept += n_stay
        if answered and self.observer is not None:
            self._safe(self.observer.on_exits, k, comp.conf[answered], float(out.macs), False)
        if eligible:
            self._shadow_exits(k, comp, eligible)
        if late_rows:
            self.stats.deadline_hits += len(late_rows)
            if self.observer is not None:
                self._safe(self.observer.on_exits, k, comp.conf[late_rows], float(out.macs), True)

    def _answer(self, out: _Delivery, chunk: Chunk, exiting: list[int], start: int) -> list[int]:
        """Answer the chunk's rows `exiting` (chunk positions; the chunk starts at batch position
        `start`); returns their batch positions."""
        req = chunk.request
        comp = out.comp
        rows: list[int] = chunk.rows.tolist()
        positions = [start + i for i in exiting]
        for i, j in zip(exiting, positions, strict=True):
            req.results[rows[i]] = make_result(out.stage, comp.logits[j], comp.probs[j], out.conf[j], out.macs)
        req.remaining -= len(exiting)
        return positions

    def _answer_late(self, out: _Delivery, chunk: Chunk, start: int) -> list[int]:
        """Stage 1 of a request whose deadline has passed: every row of the chunk answers here,
        flagged deadline_hit (as `Engine.classify` flags rows that leave after the deadline),
        confident or not; returns their batch positions (the chunk starts at `start`)."""
        req = chunk.request
        comp = out.comp
        rows: list[int] = chunk.rows.tolist()
        positions = list(range(start, start + len(rows)))
        for i, j in enumerate(positions):
            req.results[rows[i]] = make_result(
                out.stage, comp.logits[j], comp.probs[j], out.conf[j], out.macs, deadline_hit=True
            )
        req.remaining -= len(rows)
        return positions

    def _forward(self, out: _Delivery, chunk: Chunk, start: int, partial: bool, survivors: slice) -> None:
        """Queue the chunk's surviving rows at the next stage; `survivors`: theirs in comp.next_state,
        partial: some of the chunk's rows exited."""
        comp = out.comp
        assert comp.next_state is not None
        req = chunk.request
        end = start + len(chunk.rows)
        stays = ~comp.leave[start:end]  # (n,)
        keep_rows = chunk.rows[stays] if partial else chunk.rows  # (m,)
        if req.best_logits is not None and req.best_exit is not None:  # a deadline: the best answer so far
            req.best_logits[keep_rows] = comp.logits[start:end][stays]
            req.best_exit[keep_rows] = out.stage
        m = survivors.stop - survivors.start
        state = comp.next_state if m == comp.next_state.size else comp.next_state.take(survivors)
        whole = chunk.whole and not partial
        self._enqueue(out.stage + 1, Chunk(req, keep_rows, state, out.source, out.now, whole=whole))

    # -- shadow work (see .shadow) ---------------------------------------------------------------------

    def _draw_shadow(self, chunks: list[Chunk], size: int) -> np.ndarray | None:
        """(n,) bool: rows of eligible requests drawn for shadow work (Bernoulli(shadow_fraction) per
        row; kept only where the row exits), or None when no row is drawn."""
        if self.shadow_sink is None:
            return None
        eligible = [c.request.shadow is not None for c in chunks]
        if not any(eligible):
            return None
        lengths = [len(c.rows) for c in chunks]
        mask = np.repeat(np.asarray(eligible), lengths)  # (n,)
        drawn = mask & (self._shadow_rng.random(size) < self.shadow_fraction)
        return drawn if drawn.any() else None

    def _shadow_exits(self, k: int, comp: Computed, eligible: list[tuple[object, int, list[int]]]) -> None:
        """Tell the sink of the eligible exits, and queue the answered, sampled rows at stage k + 1."""
        sink = self.shadow_sink
        if sink is None:
            return
        counts: dict[int, tuple[object, int, list[int]]] = {}  # per tag (by identity)
        for tag, n, positions in eligible:
            held = counts.get(id(tag))
            counts[id(tag)] = (tag, n, positions) if held is None else (tag, held[1] + n, held[2] + positions)
        sampled = comp.shadow_rows
        # (n,) the exits' labels (argmax F = argmax softmax F); only when some row was sampled
        labels = None if sampled is None else comp.logits.argmax(axis=-1)
        for tag, n, positions in counts.values():
            self._safe(sink.on_eligible_exits, k, n, tag)
            if sampled is None or labels is None or comp.shadow_state is None:
                continue
            mine = np.intersect1d(sampled, np.asarray(positions, dtype=np.int64))  # (s,) sorted positions
            if mine.size == 0:
                continue
            item = ShadowItem(k, labels[mine], comp.shadow_state.take(np.searchsorted(sampled, mine)), tag)
            shed = self._shadow.offer(k + 1, item)
            if shed:
                self._safe(sink.on_shadow_shed, k, shed)

    async def _run_shadow(self) -> bool:
        """One shadow batch: the deepest queued stage; at the last stage, compare with the exits.
        True when it ran on the loop (as `_runs_inline` decides for request batches)."""
        assert self._loop is not None
        taken = self._shadow.take()
        if taken is None:
            return False
        k, items = taken
        state = StageBatch.concat([item.state for item in items])  # (s, ...)
        inline = self._runs_inline(k, state.size)
        try:
            if inline:
                out = self.engine.run_stage_batch(k, state)
            else:
                out = await self._loop.run_in_executor(self._executor, self.engine.run_stage_batch, k, state)
        except Exception as exc:  # shadow work never fails a request: its rows are shed
            self.log.warning("shadow batch at stage %d failed: %s", k + 1, exc)
            for item in items:
                self._shed(item)
            return inline
        sink = self.shadow_sink
        start = 0
        if k == self.num_stages - 1:
            full = np.asarray(out.logits).argmax(axis=-1)  # (s,) the full network's labels
            for item in items:
                m = len(item.labels)
                if sink is not None:
                    self._safe(sink.on_shadow, item.exit_stage, item.labels != full[start : start + m], item.tag)
                start += m
            return inline
        for item in items:
            m = len(item.labels)
            onward = ShadowItem(item.exit_stage, item.labels, out.state.take(slice(start, start + m)), item.tag)
            start += m
            shed = self._shadow.offer(k + 1, onward)
            if shed and sink is not None:
                self._safe(sink.on_shadow_shed, item.exit_stage, shed)
        return inline

    def _shed(self, item: ShadowItem) -> None:
        if self.shadow_sink is not None:
            self._safe(self.shadow_sink.on_shadow_shed, item.exit_stage, len(item.labels))

    def _drop_shadow(self) -> None:
        """Shutdown: queued shadow rows are shed."""
        for item in self._shadow.clear():
            self._shed(item)

    # -- request endings -----------------------------------------------------------------------------

    def _finalize(self, req: RequestState) -> None:
        """Mark done, stop its timer, drop its queued rows, release its admission."""
        if req.done:
            return
        req.done = True
        if req.timer is not None:
            req.timer.cancel()
        self._drop_queued(req)
        self._pending -= req.size
        self._requests.pop(req.id, None)

    def _drop_queued(self, req: RequestState, first_stage: int = 0) -> None:
        """Remove the request's chunks from the queues of `first_stage` and deeper."""
        if req.queued_chunks == 0:  # the common case: nothing queued, no scan
            return
        for k in range(first_stage, self.num_stages):
            queue = self._queues[k]
            if any(c.request is req for c in queue):
                kept = [c for c in queue if c.request is not req]
                req.queued_chunks -= len(queue) - len(kept)
                self._depth[k] = sum(len(c.rows) for c in kept)
                self._queues[k] = deque(kept)

    def _complete(self, req: RequestState) -> None:
        self._finalize(req)
        self.stats.completed += 1
        if not req.future.done():
            req.future.set_result([r for r in req.results if r is not None])

    def _fail(self, req: RequestState, exc: BaseException) -> None:
        self._finalize(req)
        if not req.future.done():
            req.future.set_exception(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for req in list(self._requests.values()):
            self._fail(req, exc)

    def _expire(self, req: RequestState) -> None:
        """Deadline timer: rows past stage 1 answer with their best-so-far F (deadline_hit); rows
        still waiting for stage 1 (queued or running) are answered by it (anytime semantics: a
        client's own deadline never fails a request, see the package docstring)."""
        if req.done:
            return
        assert req.best_exit is not None and req.best_logits is not None
        missing = [i for i, r in enumerate(req.results) if r is None]
        ready = [i for i in missing if int(req.best_exit[i]) >= 0]
        if ready:
            idx = np.asarray(ready, dtype=np.int64)
            logits = req.best_logits[idx]  # (m, classes)
            probs = softmax(logits)  # (m, classes)
            conf = confidence(probs)  # (m,)
            stages = req.best_exit[idx]  # (m,)
            for pos, i in enumerate(ready):
                stage = int(stages[pos])
                req.results[i] = make_result(stage, logits[pos], probs[pos], conf[pos], self._cum_macs[stage], True)
            if self.observer is not None:
                for stage in np.unique(stages).tolist():
                    macs = float(self._cum_macs[stage])
                    self._safe(self.observer.on_exits, stage, conf[stages == stage], macs, True)
            self.stats.deadline_hits += len(ready)
            req.remaining -= len(ready)
        if req.remaining == 0:
            self._complete(req)
            return
        # Some rows have no exit yet: they are at stage 1; their rows deeper are answered above.
        req.late = True
        self.stats.deadline_late += 1
        self._drop_queued(req, first_stage=1)

    async def _sweep(self, timeout: float) -> None:
        """Fail the requests admitted more than `timeout` seconds ago (see the module docstring)."""
        assert self._loop is not None
        while True:
            await asyncio.sleep(min(0.25, timeout / 4))
            now = self._loop.time()
            expired: list[RequestState] = []
            for req in self._requests.values():  # admission order
                if req.expires > now:
                    break
                expired.append(req)
            for req in expired:
                self.stats.timed_out += 1
                self._fail(req, DeadlineExceededError(f"no answer within the request timeout of {timeout:g} s"))

    # -- helpers -------------------------------------------------------------------------------------

    def _safe(self, fn: Callable[..., None], *args: Any) -> None:
        """Observer failures are logged, never allowed to break serving."""
        try:
            fn(*args)
        except Exception:
            self.log.exception("scheduler observer %s failed", getattr(fn, "__name__", fn))
