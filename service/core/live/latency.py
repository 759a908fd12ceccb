"""`LatencyWindow`: the latencies of the requests answered in the last few tenths of a second.

Why: SLO mode promises a p99 for admitted requests, and the queue delay it sheds on is only part of
an admitted request's time. The batch it runs in, the deeper stages and a worker thread waiting for
a busy CPU add to it, and none of that can be seen in the queue when the request is admitted
(the running batch has just emptied it). The controller reads a high quantile of what answered
requests actually took and adapts its shed limit to it (`service.core.live.slo`).

Pure and bounded: times are passed in (any monotonic clock, the same for `add` and `quantile`), and
at most `capacity` answers are kept (the oldest go first), so a burst cannot grow it.
"""

from __future__ import annotations

from collections import deque

import numpy as np

__all__ = ["LatencyWindow"]


class LatencyWindow:
    """(answered at, seconds) of recent answers; `quantile` reads the last `seconds` of them."""

    def __init__(self, seconds: float, capacity: int = 16384) -> None:
        if not seconds > 0 or capacity < 1:
            raise ValueError("need seconds > 0 and capacity >= 1")
        self.seconds = seconds
        self._answers: deque[tuple[float, float]] = deque(maxlen=capacity)

    def add(self, answered_at: float, latency: float) -> None:
        self._answers.append((answered_at, latency))

    def __len__(self) -> int:
        return len(self._answers)

    def quantile(self, now: float, q: float, min_samples: int) -> float | None:
        """The q-quantile of the latencies answered in (now - seconds, now]; None with fewer than
        `min_samples` of them (too few to say anything about a tail)."""
        answers = self._answers
        start = now - self.seconds
        while answers and answers[0][0] <= start:
            answers.popleft()
        if len(answers) < max(1, min_samples):
            return None
        return float(np.quantile(np.fromiter((latency for _, latency in answers), dtype=np.float64), q))
