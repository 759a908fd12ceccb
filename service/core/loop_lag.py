"""How late the event loop runs a timer: the wait every request and every /livez probe sees.

A liveness probe or a small request is only as fast as the event loop's next turn, so a callback
that holds the loop (a decode, a big copy, a garbage collection) shows up as lag here before it
shows up as a failed probe. Sampled by a timer every `interval_s`: a turn that held the loop for
L seconds delays the timer by about L, so the worst stall is seen within one interval; a stall
shorter than the interval can hide between two samples only when no timer was due during it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: How often the loop is sampled: often enough to see every stall that matters to a 100 ms probe,
#: rarely enough to cost nothing (20 timer callbacks a second).
DEFAULT_INTERVAL_S = 0.05


class LoopLagMonitor:
    """Sleeps `interval_s` in a loop and reports each wake-up's lateness to `observe`."""

    def __init__(self, observe: Callable[[float], None], interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.observe = observe
        self.interval_s = interval_s
        #: The largest lateness seen since start, in seconds.
        self.max_lag_s = 0.0

    async def run(self) -> None:
        """Until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - due)
            self.max_lag_s = max(self.max_lag_s, lag)
            self.observe(lag)
