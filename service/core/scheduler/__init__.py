"""Cross-request, per-stage batching of early-exit inference on one ONNX Runtime worker thread.

Why a scheduler and not `Engine.classify` per request: concurrent requests should share stage
runs (a batch of 16 costs far less than 16 batches of 1 on a GPU, and never more on a CPU), and
the survivors of *different* requests and batches should be merged before the deeper, more
expensive stages, instead of each request dragging its own shrinking batch through the network.

Design
------
* Work unit: a `Chunk` (.work) = some rows of one request at one stage: the request, the row indices
  (n,), the rows' state (`StageBatch`, batch-first arrays) and where the rows came from (the
  request for stage 0, the producing batch for deeper stages; the observer is told how many
  sources each batch merged).
  One queue (deque of chunks) per stage. Per-row work is numpy on whole chunks/batches: batches are
  built with one `np.concatenate` per state key, exits are one vectorised comparison, survivors
  are one `take` per batch; the only per-row Python is building each exiting row's `ExitResult`.
  The observer hears of a batch's exits in one call (an array of confidences), not one per image.
* Picking the next batch (event loop, whenever the worker is free): deeper stages first, stage 0
  when full or its oldest row waited `max_wait_ms`, a deeper stage waits up to `merge_wait_ms` for
  more survivors while stage 0 is full; a batch takes whole chunks front to back, FIFO. The rules
  are written once, as pure functions, in `.policy`; the dispatcher sleeps when they say nothing
  runs, until that wait ends or a submit wakes it.
* Execution: ONE dedicated worker thread (`ThreadPoolExecutor(max_workers=1)`) runs the
  concatenation, the ONNX Runtime stage, the softmax and the exit test for one batch at a time;
  the event loop only does the bookkeeping, so HTTP keeps flowing while a stage runs (2 cores: one
  for ORT, one for the loop; see service.core.engine for the thread measurement). Requests and queues
  are touched only on the event loop thread, so there are no locks.
  `run_on_loop=True` runs every batch on the event loop instead (then yields once): with a single
  CPU there is no parallelism for the thread to buy, only a GIL hand-off and a cross-thread wake-up
  per batch. But a batch on the loop holds every connection, liveness probe and deadline timer for
  its whole run, so on one CPU the server uses `inline_max_ms` instead: a batch whose stage's mean
  seconds per row so far x its rows predict at most that runs on the loop (then yields once), a
  longer one on the worker thread, as does each stage's first batch (nothing measured yet); the
  thread then runs nicer than the loop (lifecycle.ORT_THREAD_NICENESS), so the loop goes first. Small
  batches at low load skip the hand-off; big ones under load leave the loop free (both measured in
  docs/benchmarks.md and docs/reliability.md).
* Thresholds travel with each request ((B, E), the per-request budget); `early_exit=False` uses
  +inf for every stage but the last. Exits follow service.core.exit_rule (conf = max softmax(F_k)
  >= T[k]; the last always answers).
* Deadlines (absolute `time.monotonic()`), anytime semantics: the deadline is the client's own
  trade of accuracy for latency, so it never fails a request (a 5xx would read as a server fault
  and a 4xx would punish a client for asking for speed); stage 0, the cheapest exit, always runs.
  A loop timer fires at the deadline: rows that have not exited and finished at least stage 0
  answer at once with their latest F (deadline_hit=True). Rows still waiting for stage 0 (queued
  or in the running batch) mark the request late: stage 0 answers each of them, confident or not
  (deadline_hit=True), and the request's deeper queued chunks are dropped. A deadline already
  passed at submit (a tiny deadline_ms) makes the request late at once, without a timer. Rows in
  a running deeper batch are ignored when it returns. The engine's current ORT run is not
  interrupted (ORT cannot be), so the worker may stay busy for one batch. A late request is still
  bound by the request timeout below.
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

Modules: `.policy` (which stage runs next, which chunks form its batch: pure functions),
`.lifecycle` (`Scheduler`: start/stop, submit, dispatch, execution, deadlines, the sweeper),
`.work` (request, chunk and batch-result records), `.stats` (counters and the observer protocol).
"""

from service.core.scheduler.lifecycle import Scheduler
from service.core.scheduler.stats import SchedulerObserver, SchedulerStats, StageStats

__all__ = ["Scheduler", "SchedulerObserver", "SchedulerStats", "StageStats"]
