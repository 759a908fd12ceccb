"""Shadow work: sampled early-exited images run on through the remaining stages, off the critical path.

Why: an early exit's answer is only as good as its agreement with the full network, and nothing on
live traffic measures that unless some exited images also run to the end. A small Bernoulli
sample of early-exited images (`Scheduler(shadow_fraction=...)`, drawn per exiting row) keeps its
stage state and is queued here after its request has been answered; the full network's label is
then compared with the exit's label and reported to a `ShadowSink` (service.core.shadow).

The rules that keep it off the critical path (enforced in `service.core.scheduler.lifecycle`):

* **After the answer**: a row is queued here only once its request's answer is set, so the sampled
  request never waits for its own shadow work, and nothing here can change that answer (the queued
  state is the stage's output, a copy the request no longer holds).
* **Spare capacity only**: the dispatcher runs a shadow batch only when every request queue is
  empty, i.e. when the worker would otherwise idle; shadow rows never join a request batch, so a
  request batch is never larger or later because of them. The one residual cost: a request that
  arrives while a shadow batch runs waits for that batch (at most `SHADOW_BATCH` rows of one
  stage), as it would wait for any batch already running.
* **Shed first**: the queues hold at most `SHADOW_QUEUE` rows; a row sampled while they are full is
  shed (counted, never queued), and shutdown drops whatever is queued.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.core.engine import StageBatch

__all__ = ["SHADOW_BATCH", "SHADOW_QUEUE", "ShadowItem", "ShadowQueues", "ShadowSink"]

#: Rows per shadow batch: small, so a request arriving during one waits little (see the module doc).
SHADOW_BATCH = 8
#: Rows queued for shadow work at most (all stages); more are shed.
SHADOW_QUEUE = 256


class ShadowSink(Protocol):
    """Receives shadow results and eligible exits on the event loop; stages are 0-based."""

    def on_eligible_exits(self, stage: int, count: int, tag: object) -> None:
        """`count` images of shadow-eligible requests (tagged `tag`) were answered at `stage`."""
        ...

    def on_shadow(self, stage: int, disagree: np.ndarray, tag: object) -> None:
        """Shadow samples answered at exit `stage` finished the network: (m,) bool, True where the
        exit's label differs from the full network's."""
        ...

    def on_shadow_shed(self, stage: int, count: int) -> None:
        """`count` sampled images answered at `stage` were shed (queues full, or shutdown)."""
        ...


@dataclass(slots=True)
class ShadowItem:
    """Sampled rows of one exit, waiting at stage `next_stage`."""

    exit_stage: int  # where their answer was sent (0-based)
    labels: np.ndarray  # (m,) int64: the exit's labels
    state: StageBatch  # m rows: the input of `next_stage`
    tag: object  # the thresholds in force when they were answered (opaque to the scheduler)


class ShadowQueues:
    """Per-stage FIFO queues of shadow rows with one bound on their total (event loop only)."""

    def __init__(self, num_stages: int, capacity: int = SHADOW_QUEUE, batch: int = SHADOW_BATCH) -> None:
        self.capacity = capacity
        self.batch = batch
        self._queues: list[deque[ShadowItem]] = [deque() for _ in range(num_stages)]
        self.rows = 0

    def offer(self, stage: int, item: ShadowItem) -> int:
        """Queue `item` at `stage` (in pieces of at most `batch` rows) if it fits; returns the rows
        shed (0 or all of them)."""
        m = len(item.labels)
        if self.rows + m > self.capacity:
            return m
        for start in range(0, m, self.batch):
            part = slice(start, start + self.batch)
            piece = item
            if m > self.batch:
                piece = ShadowItem(item.exit_stage, item.labels[part], item.state.take(part), item.tag)
            self._queues[stage].append(piece)
        self.rows += m
        return 0

    def take(self) -> tuple[int, list[ShadowItem]] | None:
        """The deepest non-empty stage and up to `batch` rows from its front (whole items, the first
        always), or None when nothing is queued. Deepest first: finishing work frees the bound."""
        for k in range(len(self._queues) - 1, -1, -1):
            queue = self._queues[k]
            if queue:
                items = [queue.popleft()]
                rows = len(items[0].labels)
                while queue and rows + len(queue[0].labels) <= self.batch:
                    items.append(queue.popleft())
                    rows += len(items[-1].labels)
                self.rows -= rows
                return k, items
        return None

    def clear(self) -> list[ShadowItem]:
        """Drop everything queued (shutdown); returns what was dropped."""
        dropped = [item for queue in self._queues for item in queue]
        for queue in self._queues:
            queue.clear()
        self.rows = 0
        return dropped
