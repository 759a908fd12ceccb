"""The scheduler's units of work: a submitted request, a chunk of its rows at one stage, and what
the worker computed for one batch. Touched only on the event loop thread (no locks)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import numpy as np

from service.core.engine import ExitResult, StageBatch

__all__ = ["Chunk", "Computed", "RequestState"]


class RequestState:
    """One submit: its images' thresholds, answers so far and the future its caller awaits."""

    __slots__ = (
        "best_exit",
        "best_logits",
        "deadline",
        "done",
        "expires",
        "future",
        "id",
        "late",
        "queued_chunks",
        "remaining",
        "results",
        "shadow",
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
        # The deadline passed while some rows had no exit: stage 1 answers those, deeper stages nothing.
        self.late = False
        # Best-so-far F per row, kept only for requests with a deadline: (B, classes), exit (B,).
        self.best_logits: np.ndarray | None = None
        self.best_exit: np.ndarray | None = None
        # Shadow sampling (service.core.scheduler.shadow): the tag of the thresholds in force when
        # the request is eligible (on the global budget), else None.
        self.shadow: object | None = None


class Chunk:
    """Rows of one request waiting at one stage."""

    __slots__ = ("enqueued", "request", "rows", "source", "state", "whole")

    def __init__(
        self,
        request: RequestState,
        rows: np.ndarray,
        state: StageBatch,
        source: int,
        enqueued: float,
        whole: bool = False,
    ) -> None:
        self.request = request
        self.rows = rows  # (n,) int64 indices into the request
        self.state = state  # n rows
        self.source = source  # the request (stage 0) or the batch that produced these rows
        self.enqueued = enqueued  # loop.time()
        self.whole = whole  # rows == arange(request.size): per-row lookups can slice instead of gather

    def thresholds(self, k: int) -> np.ndarray:
        """(n,) the rows' thresholds at stage k."""
        table = self.request.thresholds  # (B, E)
        return table[:, k] if self.whole else table[self.rows, k]

    def split_front(self, n: int) -> Chunk:
        """Detach the first n rows as a new chunk (same request, source and queue time); keep the rest."""
        front = Chunk(self.request, self.rows[:n], self.state.take(slice(0, n)), self.source, self.enqueued)
        self.rows = self.rows[n:]
        self.state = self.state.take(slice(n, None))
        self.whole = False
        return front


@dataclass
class Computed:
    """Worker-thread result of one batch."""

    logits: np.ndarray  # (n, classes)
    probs: np.ndarray  # (n, classes)
    conf: np.ndarray  # (n,)
    leave: np.ndarray  # (n,) bool
    next_state: StageBatch | None  # m rows, None when nobody survives
    seconds: float
    shadow_rows: np.ndarray | None = None  # (s,) batch positions sampled for shadow work (exiting rows)
    shadow_state: StageBatch | None = None  # s rows: their state for the next stage
