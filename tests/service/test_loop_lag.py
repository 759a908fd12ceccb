"""The event loop lag monitor sees a callback that holds the loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.core.loop_lag import LoopLagMonitor


def test_a_blocking_callback_shows_as_lag() -> None:
    seen: list[float] = []

    async def scenario() -> LoopLagMonitor:
        monitor = LoopLagMonitor(seen.append, interval_s=0.01)
        task = asyncio.create_task(monitor.run())
        while len(seen) < 3:  # the monitor is sampling
            await asyncio.sleep(0.005)
        time.sleep(0.2)  # holds the loop, as a decode on the loop did
        count = len(seen)
        while len(seen) == count:
            await asyncio.sleep(0.005)
        task.cancel()
        return monitor

    monitor = asyncio.run(scenario())
    # A lower bound only: more load can only make the lag larger.
    assert monitor.max_lag_s >= 0.15
    assert max(seen) == monitor.max_lag_s
    assert min(seen) >= 0.0


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s must be positive"):
        LoopLagMonitor(lambda _: None, interval_s=0)
