"""Which stage runs next and which queued chunks form its batch: pure functions of the queue
contents, the time and the settings.

Why apart from the asyncio code: this is the batching policy, the part worth reasoning about and
changing, and as plain functions of numbers it is tested without an engine, an event loop or
timing (tests/service/test_scheduler_policy.py).

The rules, applied whenever the worker is free:
1. Deeper stages go first, so admitted work finishes and frees memory and latency: the deepest
   non-empty stage k > 0 runs, *unless* stage 0 holds a full batch (the server is loaded); then
   stage k waits (until it is full, or at most `merge_wait` after its oldest chunk arrived) to
   collect the survivors of several stage-0 batches into one fuller stage-k batch.
2. Stage 0 runs when it holds `max_batch_size` rows or its oldest row has waited `max_wait`.
3. Otherwise nothing runs until stage 0's wait ends (or new work arrives).
Without batching, or while shutting down, nothing waits: the deepest non-empty stage runs.

A batch takes whole chunks front to back, and the first chunk that does not fit is split, so
requests are served FIFO within a stage and one batch mixes rows of many requests. Without
batching a batch holds the rows of one request only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["BatchPlan", "BatchingSettings", "Pick", "pick_stage", "plan_batch"]


@dataclass(frozen=True, slots=True)
class BatchingSettings:
    """The knobs of the policy (times in seconds, on the clock the queue times are taken on)."""

    max_batch_size: int  # rows per stage batch, >= 1
    max_wait: float  # how long stage 0's oldest row may wait for a fuller batch
    merge_wait: float  # how long a deeper stage may wait for more survivors while stage 0 is full
    batching: bool = True  # False: never wait, one request per batch


class Pick(NamedTuple):
    """The stage to run now, or (stage None) how long nothing needs to run."""

    stage: int | None
    sleep: float | None = None  # seconds until a wait ends; None: until new work arrives


class BatchPlan(NamedTuple):
    """What to take from the front of a stage queue."""

    whole: int  # chunks taken whole, front first
    split: int  # rows taken from the front of the next chunk (0: none)
    rows: int  # rows in the batch


def pick_stage(
    depths: Sequence[int], oldest: Sequence[float], now: float, settings: BatchingSettings, *, closing: bool = False
) -> Pick:
    """Apply the rules of the module docstring.

    depths[k]: rows queued at stage k; oldest[k]: when the front chunk of stage k was queued
    (read only where depths[k] > 0); now: the current time on the same clock.
    """
    last = len(depths) - 1
    if not settings.batching or closing:
        for k in range(last, -1, -1):
            if depths[k] > 0:
                return Pick(k)
        return Pick(None)
    full = settings.max_batch_size
    stage0_full = depths[0] >= full
    for k in range(last, 0, -1):
        if depths[k] > 0 and (not stage0_full or depths[k] >= full or now >= oldest[k] + settings.merge_wait):
            return Pick(k)
    if stage0_full:  # the deeper stages wait for more survivors: stage 0 makes them meanwhile
        return Pick(0)
    if depths[0] > 0:
        ready_at = oldest[0] + settings.max_wait
        return Pick(0) if now >= ready_at else Pick(None, ready_at - now)
    return Pick(None)


def plan_batch(front: Iterable[tuple[int, int]], settings: BatchingSettings) -> BatchPlan:
    """The batch to take from a stage queue, given (rows, request id) of its chunks front to back.

    `front` is read lazily, only as far as the batch reaches (a queue may hold a thousand chunks).
    """
    whole = 0
    room = settings.max_batch_size
    first: int | None = None
    for rows, request in front:
        if not settings.batching:
            if first is None:
                first = request
            elif request != first:
                break
        if rows > room:  # also when the batch is full (room 0): the plan ends here
            return BatchPlan(whole, room, settings.max_batch_size)
        whole += 1
        room -= rows
    return BatchPlan(whole, 0, settings.max_batch_size - room)
