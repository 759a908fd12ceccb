"""What the scheduler tells the outside: the events it pushes and the counters it keeps.

Events go to a `SchedulerObserver` (service.http.metrics implements it; the core imports no
metrics library), called on the event loop thread with 0-based stages. How well batches merge
requests and survivors is reported only that way, per batch, so it is visible in production (as
Prometheus counters) and nothing keeps a per-batch log. The counters (`SchedulerStats`) are plain
numbers since start(): the retry-after estimate of a refused submit is computed from them, and
tests read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["SchedulerObserver", "SchedulerStats", "StageStats"]


class SchedulerObserver(Protocol):
    """Receives scheduler events on the event loop thread; stage indices are 0-based."""

    def on_stage_batch(self, stage: int, batch_size: int, seconds: float, requests: int, sources: int) -> None:
        """One batch of `batch_size` rows ran in `seconds`; its rows came from `requests` requests
        and `sources` sources (stage 0: submits; deeper stages: the batches that produced them, so
        sources > 1 means survivors of several batches were merged)."""
        ...

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


@dataclass
class SchedulerStats:
    stages: list[StageStats]
    completed: int = 0
    rejected: int = 0  # over capacity
    failed: int = 0  # stage failures
    deadline_hits: int = 0  # images answered best-so-far
    deadline_late: int = 0  # requests whose deadline passed before every row had an exit (stage 1 answers)
    timed_out: int = 0  # requests failed by the request timeout
    cancelled: int = 0

    def record_batch(self, stage: int, size: int, seconds: float) -> None:
        """A batch of `size` rows ran at `stage` in `seconds` (worker time)."""
        st = self.stages[stage]
        st.batches += 1
        st.items += size
        st.seconds += seconds

    def drain_seconds(self, pending: int) -> float:
        """Seconds until `pending` admitted images should have drained (0.1 .. 30; 1 without data).

        Worker seconds of all stages per image admitted at stage 0, times the backlog: what a
        refused client is told to wait (Retry-After).
        """
        admitted = self.stages[0].items
        worked = sum(s.seconds for s in self.stages)
        if admitted == 0 or worked <= 0.0:
            return 1.0
        return float(min(30.0, max(0.1, math.ceil(pending * (worked / admitted) * 10) / 10)))
