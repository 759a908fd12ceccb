"""SLO mode: accuracy scaling under overload, on queue delay and service rate, with hysteresis.

Why: a server that only sheds (429) under a burst turns every excess request into an error. An
early-exit model has a cheaper point on its frontier for every accuracy it may give up, so the
server can instead move requests on the global budget to a cheaper *rung* of a ladder (each rung a
calibrated point no worse than the floor `BOOSTSERVE_MAX_ACCURACY_DROP_UNDER_LOAD`), raising its
service rate, and move back when the load falls. Only at the cheapest allowed rung does it shed.

Signals, each control tick (`Signals`): the queue delay d (how long admitted images wait, the
scheduler's oldest queued image or its backlog times the per-image cost, whichever is larger), the
arrival rate λ (images admitted per second, smoothed), the completion rate X over the tick, and
the per-image seconds t_k of each stage (smoothed).

The service-rate model: per image at rung r the server spends c_r = o + Σ_k reach_r(k) · t_k, where
reach_r(k) is the calibrated share of images that reach stage k under rung r's thresholds and o is
the per-image work outside the stages (HTTP, decode, answer), unknown a priori. Whenever the queue
is not empty for a whole tick the server is saturated and X is its capacity at the rung in force,
so o = 1/X − Σ_k reach_r(k) t_k (smoothed, never below 0). Capacity at any rung: μ_j = 1 / c_j.
Until the server has been saturated once, o is not unknown (zero, which read the first overload as
a short queue and moved a tick late) but bounded from above by its own CPU time: o ≤ CPU seconds
per answer − Σ_k reach_r(k) t_k (`Signals.cpu_s`). At light load that includes the cost of small
batches and of idle turns of the loop (and, where the stages run on several cores, their CPU
time adds up beyond the wall clock), so it overstates o, which only makes the first move come
sooner and go further; the first saturated tick replaces it. Until then the step back to a more
accurate rung waits for the calm alone, not for the bound's (pessimistic) capacity.
The model sizes a move, so a step in load is answered by the one rung that fits, not by a blind
walk: the least degraded rung j with λ ≤ ρ_high · μ_j.

The rules (hysteresis: distinct levels, utilisations and a dwell for each direction):

* **cheaper** when d > `delay_high` (a share of the latency target): to the rung the model says
  fits (at least one rung down). If the delay is still above `delay_high` `dwell_down_s` after the
  last move and the backlog has not fallen since, the model underestimated the load: down again,
  sized by the model (at least one rung). A backlog that is falling is draining, not a reason to
  move again. The rate used to size a step down is the larger of the smoothed arrival rate and
  the last tick's, so a step in load is sized by what arrives now, not by the average.
* **more accurate**, one rung at a time, when d smoothed over `smoothing_s` has stayed below
  `delay_low` (and d itself never passed `delay_high`) for `hold_up_s`, and
  the model says the load fits the more accurate rung with room: λ ≤ ρ_up · μ_{r−1}, ρ_up < ρ_high.
  A tick that refused requests is never calm: with a small shed limit the queue delay stays low
  *because* the floor sheds, which must not read as a reason to spend more per image.
  Between the levels nothing moves, which bounds oscillation: on the simulated queue of the tests
  a steady load settles on one rung, which a Poisson burst may move once and the calm move back (at
  most two rungs apart, at most two changes in 80 s).
* **shed** (429) only at the cheapest rung, while the measured queue delay exceeds the shed limit
  L: admitting more would break the target anyway. Measured, not predicted: the prediction rests on
  the learnt overhead, and a wrong estimate must not refuse traffic.
* **the shed limit adapts to the latency answered requests had** (at the cheapest rung only). L
  starts at `shed_min_share` × the target, its least, and is set back there on every arrival at the
  floor from above: a step in load reaches the floor with a queue already building, and a limit left
  at its most would admit images for `shed_share` × T before the first refusal; so L starts where
  the target is safe and grows only on evidence that a longer queue still keeps it (the A/B against
  starting at the most is in docs/policies.md). An admitted image waits about L in the queue, and
  then the batch it runs in, the deeper stages and a worker thread that shares a busy CPU add their
  own time, which the queue cannot show. So the controller reads the p99 of the latencies answered
  in the last `latency_window_s` (`Signals.latency`). Above the target, and only while the queue is
  saturated (`Signals.saturated`), L shrinks in proportion (L·T/p99, at most halved, never below
  `shed_min_share` × T). Below `latency_low_share` × T it grows by `shed_step_share` × T, up to
  `shed_share` × T, but only while the limit binds: the queue saturated, or the tick refused
  requests (bursts at a moderate load, answered fast: refusals the target did not need). A short
  queue that refuses nothing says nothing about what a longer one would cost, so L stays. A change
  waits `latency_window_s` after the last one, so each change is judged on answers given after the
  one before (no wind-up on stale samples). Saturation gates the shrink because shedding can only
  shorten a queue: a tail from elsewhere (a host that stalls the VM) drove an ungated limit to its
  least in a scratch run, where the floor then refused nearly everything while serving a fraction of
  its capacity (docs/policies.md). The least, 0.2 T, stays above what a queue holds by design (the
  batch wait, one batch run).

Saturation (when the overhead is learnt) is read from the measured queue too (its delay above
`delay_low` at both ends of the tick), never from the prediction: a prediction that declared itself
saturated would learn a "capacity" from the few requests it admits and shed ever more.

Never past the floor: the ladder ends at the floor's rung and the index is clamped to it.
Pure: times are passed in (tests drive it with a simulated clock and queue).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Rung", "Signals", "SloConfig", "SloController"]

#: Completions in a saturated tick below which its throughput is too noisy to learn the overhead from.
MIN_COMPLETED = 10


@dataclass(frozen=True)
class SloConfig:
    latency_target_s: float
    delay_high_share: float = 0.4  # act when the queue delay passes this share of the target
    delay_low_share: float = 0.1  # consider stepping back below this share
    utilisation_high: float = 0.9  # a step down aims for λ <= this · capacity
    utilisation_up: float = 0.8  # a step back needs λ <= this · capacity of the more accurate rung
    dwell_down_s: float = 0.3  # the least time between two steps down
    hold_up_s: float = 3.0  # calm time before a step back
    shed_share: float = 0.6  # at the floor: the largest shed limit, as a share of the target
    smoothing_s: float = 1.0  # time constant of the rate and overhead estimates
    shed_min_share: float = 0.2  # the smallest shed limit, and the first, as a share of the target
    shed_step_share: float = 0.05  # the shed limit grows by this share of the target per change
    latency_low_share: float = 0.8  # the shed limit grows while answered p99 is below this share
    latency_window_s: float = 0.5  # answers the p99 is read from; also the least time between changes
    latency_quantile: float = 0.99  # the promise: p99 of admitted requests
    min_latency_samples: int = 50  # fewer answers in the window: no latency signal

    def __post_init__(self) -> None:
        if not self.latency_target_s > 0:
            raise ValueError("latency_target_s must be > 0")
        if not 0 < self.delay_low_share < self.delay_high_share:
            raise ValueError("need 0 < delay_low_share < delay_high_share")
        if not 0 < self.utilisation_up < self.utilisation_high <= 1:
            raise ValueError("need 0 < utilisation_up < utilisation_high <= 1")
        if not 0 < self.shed_min_share <= self.shed_share:
            raise ValueError("need 0 < shed_min_share <= shed_share")
        if not (self.shed_step_share > 0 and 0 < self.latency_low_share < 1 and self.latency_window_s > 0):
            raise ValueError("need shed_step_share > 0, 0 < latency_low_share < 1 and latency_window_s > 0")
        if not 0 < self.latency_quantile < 1:
            raise ValueError("need 0 < latency_quantile < 1")

    @property
    def delay_high(self) -> float:
        return self.latency_target_s * self.delay_high_share

    @property
    def delay_low(self) -> float:
        return self.latency_target_s * self.delay_low_share

    @property
    def shed_max(self) -> float:
        return self.latency_target_s * self.shed_share

    @property
    def shed_min(self) -> float:
        return self.latency_target_s * self.shed_min_share


@dataclass(frozen=True)
class Rung:
    """One point of the ladder: the share of images reaching each stage (reach[0] = 1)."""

    reach: tuple[float, ...]

    @classmethod
    def from_exit_fractions(cls, fractions: Sequence[float]) -> Rung:
        tail = 0.0
        reach: list[float] = []
        for f in reversed(list(fractions)):
            tail += float(f)
            reach.append(min(1.0, tail))
        return cls(tuple(reversed(reach)))


@dataclass(frozen=True)
class Signals:
    now: float  # seconds (any monotonic clock)
    delay: float  # queue delay, seconds
    backlog: int  # images admitted and not answered
    admitted: int  # images admitted during the tick
    completed: int  # images answered during the tick
    stage_seconds: Sequence[float | None]  # per-image seconds of each stage over the tick (None: no batch)
    saturated: bool  # the queue held work for the whole tick
    latency: float | None = None  # p99 of the requests answered in the last latency_window_s (None: too few)
    refused: int = 0  # images the shed rule refused during the tick
    cpu_s: float | None = None  # the process's CPU seconds over the tick (None: not measured)


class SloController:
    """The controller of the module docstring; `rung` is the index in force (0 = not degraded)."""

    def __init__(self, config: SloConfig, rungs: Sequence[Rung]) -> None:
        if not rungs:
            raise ValueError("the ladder needs at least rung 0")
        self.config = config
        self.rungs = list(rungs)
        self.rung = 0
        self.arrival_rate = 0.0  # images/s, smoothed
        self.overhead = 0.0  # o: seconds per image outside the stages
        self.stage_seconds: list[float] = [0.0] * len(rungs[0].reach)
        self._last_now: float | None = None
        self._last_move = -math.inf
        self._backlog_at_move = -1.0  # -1: no step down to wait for
        self._last_rate = 0.0  # images/s admitted over the last tick (unsmoothed)
        self._calm_since: float | None = None
        self.smoothed_delay = 0.0  # the calm test reads this (time constant smoothing_s)
        self.shed_delay = config.shed_min  # L: the floor sheds while the queue delay passes it
        self._last_shed_change = -math.inf
        self.saturated_once = False  # o learnt from a saturated tick (else: the CPU bound, if any)

    @property
    def floor(self) -> int:
        return len(self.rungs) - 1

    # -- the model -------------------------------------------------------------------------------------
    def stage_work(self, rung: int) -> float:
        reach = self.rungs[rung].reach
        return sum(r * t for r, t in zip(reach, self.stage_seconds, strict=True))

    def cost(self, rung: int) -> float:
        """Predicted seconds of work per image at `rung`."""
        return self.overhead + self.stage_work(rung)

    def capacity(self, rung: int) -> float:
        """Predicted images per second at `rung` (inf before any measurement)."""
        c = self.cost(rung)
        return math.inf if c <= 0.0 else 1.0 / c

    def predicted_wait(self, backlog: int) -> float:
        return backlog * self.cost(self.rung)

    def should_shed(self, queue_delay: float) -> bool:
        """Refuse a new request now? Only at the floor, and only while the queue's measured delay (its
        oldest waiting image) passes the shed limit: admitting more would break the target."""
        return self.rung == self.floor and queue_delay > self.shed_delay

    # -- one tick ----------------------------------------------------------------------------------------
    def update(self, s: Signals) -> int:
        """Learn from one tick's signals and return the rung to serve."""
        dt = 0.0 if self._last_now is None else max(0.0, s.now - self._last_now)
        self._last_now = s.now
        if dt > 0.0:
            self._learn(s, dt)
            self.smoothed_delay += (1.0 - math.exp(-dt / self.config.smoothing_s)) * (s.delay - self.smoothed_delay)
        cfg = self.config
        self._adapt_shed_limit(s)
        if s.delay > cfg.delay_high:
            self._calm_since = None
            self._maybe_down(s)
        elif s.refused == 0 and self.smoothed_delay < cfg.delay_low:
            if self._calm_since is None:
                self._calm_since = s.now
            self._maybe_up(s.now)
        else:
            self._calm_since = None
        return self.rung

    def _adapt_shed_limit(self, s: Signals) -> None:
        """At the floor: shrink the shed limit while answered p99 is over the target and the queue is
        saturated; grow it while p99 is well under and the limit binds (a saturated queue, or a tick
        that refused); one change per window."""
        cfg = self.config
        if self.rung != self.floor or s.latency is None or s.now - self._last_shed_change < cfg.latency_window_s:
            return
        target = cfg.latency_target_s
        if s.latency > target and s.saturated:
            shrink = max(0.5, target / s.latency)
            self.shed_delay = max(cfg.shed_min, self.shed_delay * shrink)
        elif s.latency < cfg.latency_low_share * target and self._limit_binds(s) and self.shed_delay < cfg.shed_max:
            self.shed_delay = min(cfg.shed_max, self.shed_delay + cfg.shed_step_share * target)
        else:
            return
        self._last_shed_change = s.now

    @staticmethod
    def _limit_binds(s: Signals) -> bool:
        """Is the shed limit deciding admissions? A saturated queue presses on it; a refusal passed it."""
        return s.saturated or s.refused > 0

    def _learn(self, s: Signals, dt: float) -> None:
        w = 1.0 - math.exp(-dt / self.config.smoothing_s)
        self._last_rate = s.admitted / dt
        self.arrival_rate += w * (self._last_rate - self.arrival_rate)
        for k, t in enumerate(s.stage_seconds):
            if t is not None:
                self.stage_seconds[k] += w * (t - self.stage_seconds[k]) if self.stage_seconds[k] else t
        if s.saturated and s.completed >= MIN_COMPLETED:
            observed = dt / s.completed - self.stage_work(self.rung)  # 1/X minus the stages' share
            first = not self.saturated_once or not self.overhead
            self.overhead = max(0.0, observed if first else self.overhead + w * (observed - self.overhead))
            self.saturated_once = True
        elif not self.saturated_once and s.cpu_s is not None and s.completed >= MIN_COMPLETED:
            bound = s.cpu_s / s.completed - self.stage_work(self.rung)  # CPU per answer minus the stages
            self.overhead = max(0.0, self.overhead + w * (bound - self.overhead) if self.overhead else bound)

    def _fits(self, rung: int, utilisation: float, rate: float) -> bool:
        return rate <= utilisation * self.capacity(rung)

    def _move(self, rung: int, now: float, backlog: float) -> None:
        rung = max(0, min(self.floor, rung))
        if rung == self.floor and self.rung != self.floor:
            self.shed_delay = self.config.shed_min
            self._last_shed_change = now
        self.rung = rung
        self._last_move = now
        self._backlog_at_move = backlog
        self._calm_since = None

    def _maybe_down(self, s: Signals) -> None:
        if self.rung == self.floor:
            return
        cfg = self.config
        if s.now - self._last_move < cfg.dwell_down_s:
            return
        if s.backlog < self._backlog_at_move:
            return  # draining: the last move is working (a backlog, not a delay: the delay of the
            # same backlog falls with the cost per image at the move itself)
        rate = max(self.arrival_rate, self._last_rate)  # a step shows in the last tick before the average
        sized = next(
            (j for j in range(self.rung + 1, self.floor + 1) if self._fits(j, cfg.utilisation_high, rate)), None
        )
        target = self.floor if sized is None else sized
        self._move(max(target, self.rung + 1), s.now, s.backlog)

    def _maybe_up(self, now: float) -> None:
        if self.rung == 0 or self._calm_since is None:
            return
        cfg = self.config
        if now - self._calm_since < cfg.hold_up_s or now - self._last_move < cfg.hold_up_s:
            return
        # The CPU bound overstates o at light load: it may hasten a step down, never block the way back.
        if not self.saturated_once or self._fits(self.rung - 1, cfg.utilisation_up, self.arrival_rate):
            self._move(self.rung - 1, now, -1.0)
