"""The label-free accuracy monitor: shadow samples, their calibrated expectation, a drift test, and
drift tightening of a global `max_accuracy_drop`.

Why: every promise of a budget is made on the held-out split. On live traffic there are no labels,
but there is one label-free check: how often an early exit's answer differs from the full
network's. An image where they agree cannot have lost accuracy against the full network, so the
live disagreement rate bounds the live loss from above (loosely: both can be wrong together).
The scheduler runs a small sample of early-exited images to the end, off the critical path
(`service.core.scheduler.shadow`), and reports here (`ShadowMonitor` is its `ShadowSink`).

Like with like: the live disagreement is compared with the disagreement the calibration predicts
*for the thresholds in force*, never with the allowed drop (the loose bound would always exceed
it). The calibration arrays hold each exit's correctness, not its label, so the held-out
disagreement among images answered at exit k is known only between two counts:

* lower: exactly one of (exit k, full network) is right -- they must disagree;
* upper: not both right -- both wrong may still agree on the same wrong label.

The drift test uses the **upper** count: under no drift its null (live disagreement <= the
calibration's) then holds whatever the both-wrong images do, so the false-alarm rate is at most the
test's level. The price is power (the procedure, the level and the power measured by resampling:
docs/monitoring.md). An artifact whose calibration also stored the exits' labels would make both
counts the exact disagreement (`expected_disagreement(..., agrees=...)`); the shipped one does not.

The test (`drift_statistic`), on tumbling windows of `DRIFT_WINDOW` shadow samples taken under one
point: the live rate among early-exited images is estimated per exit and weighted by the live
exit mix of the global budget's images (exact counts, so shedding that favours some exits does not
bias it), and compared with the calibration's rate among its early-exited images (the calibration's
own mix: a shift of the mix towards exits that disagree more is drift too, since the promise is
about all images). z = (live - expected) / sqrt(var(live) + var(expected)); drift when z >
`DRIFT_Z`.

Tightening (`DriftTightener`, `DriftControl`): on a drift window the global `max_accuracy_drop=d`
is served as `max_accuracy_drop=d / 2**level` (level + 1; the certified point of a smaller drop is
never cheaper, and levels that certify the same point are skipped), through the live layer
(`LiveOperatingPoint.adjust("drift", ...)`), until a window is back within expectation at the new
point's own expectation; after `RELAX_WINDOWS` calm windows it steps back one level, and a drift
right after such a step doubles that wait (no oscillation faster than that). A new global budget
starts at level 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.core.artifact import CalibrationData
from service.core.budget import BudgetResolver, ResolvedBudget
from service.core.errors import InvalidBudgetError
from service.core.exit_rule import exit_indices
from service.core.knobs import Budget
from service.core.live import LiveOperatingPoint
from service.core.policies import ThresholdResult

__all__ = [
    "DRIFT_OWNER",
    "DRIFT_WINDOW",
    "DRIFT_Z",
    "MAX_LEVEL",
    "RELAX_WINDOWS",
    "RELAX_Z",
    "DriftControl",
    "DriftTightener",
    "Expectation",
    "ShadowMonitor",
    "ShadowObserver",
    "WindowResult",
    "drift_budget",
    "drift_statistic",
    "expected_disagreement",
]

log = logging.getLogger("boostserve.shadow")

#: Shadow samples per drift test. At the default 1 % sample that is ~100,000 images on the global
#: budget per decision: enough for a rate of a few per cent to be measured to about +-0.5 points.
DRIFT_WINDOW = 1000
#: One-sided critical value: level 0.001 per window under the normal approximation (its real level
#: is measured by resampling in docs/monitoring.md).
DRIFT_Z = 3.09
#: A window is calm (counts towards stepping back) when z is below this.
RELAX_Z = 1.0
#: Calm windows needed before one step back (doubled after a step back that drifted again).
RELAX_WINDOWS = 4
#: Longest wait before stepping back, in windows.
MAX_RELAX_WINDOWS = 64
#: Deepest tightening: d / 2**MAX_LEVEL (then the full network, which has no early exit to watch).
MAX_LEVEL = 10
#: The live layer's owner name of the drift adjustment.
DRIFT_OWNER = "drift"


# --------------------------------------------------------------------------------------------------
# what the calibration predicts
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Expectation:
    """Held-out counts per early exit k (0 .. E-2) under one threshold vector."""

    answered: np.ndarray  # (E-1,) held-out images answered at exit k
    upper: np.ndarray  # (E-1,) of those, not (exit right and full right): disagreements at most
    lower: np.ndarray  # (E-1,) of those, exactly one of the two right: disagreements at least
    exact: bool = False  # the exits' labels were known: upper == lower == the disagreements

    @property
    def early(self) -> int:
        """Held-out images answered before the last exit."""
        return int(self.answered.sum())

    def rates(self, bound: str = "upper") -> list[float | None]:
        """Per early exit, the held-out disagreement rate (None where no held-out image exits)."""
        counts = self.upper if bound == "upper" else self.lower
        return [None if c == 0 else float(y) / float(c) for y, c in zip(counts, self.answered, strict=True)]

    def early_rate(self, bound: str = "upper") -> float | None:
        """The held-out rate among early-exited images (None without any)."""
        counts = self.upper if bound == "upper" else self.lower
        return None if self.early == 0 else float(counts.sum()) / self.early


def expected_disagreement(
    cal: CalibrationData, thresholds: Sequence[float], agrees: np.ndarray | None = None
) -> Expectation:
    """The held-out disagreement counts of `thresholds` (see the module docstring for the bounds).

    ``agrees``: optional (E, n) bool, exit k's label equals the last exit's; when given, both counts
    are the exact disagreements.
    """
    exits = exit_indices(cal.confidence, thresholds)  # (n,)
    num_early = cal.num_exits - 1
    right = np.asarray(cal.correct, dtype=bool)  # (E, n)
    cols = np.arange(cal.num_samples)
    at_exit = right[exits, cols]  # (n,) the answer's correctness
    full = right[-1]  # (n,)
    early = exits < num_early  # (n,)
    answered = np.bincount(exits[early], minlength=num_early)[:num_early]
    if agrees is not None:
        differ = ~np.asarray(agrees, dtype=bool)[exits, cols] & early
        exact = np.bincount(exits[differ], minlength=num_early)[:num_early]
        return Expectation(answered, exact, exact.copy(), exact=True)
    upper = np.bincount(exits[early & ~(at_exit & full)], minlength=num_early)[:num_early]
    lower = np.bincount(exits[early & (at_exit != full)], minlength=num_early)[:num_early]
    return Expectation(answered, upper, lower)


def drift_statistic(
    expectation: Expectation, exits: np.ndarray, samples: np.ndarray, disagreements: np.ndarray
) -> tuple[float, float]:
    """(z, live rate) of one window; z is NaN when there is nothing to compare.

    exits (E-1,): images of the global budget answered at each early exit during the window (the
    live mix); samples, disagreements (E-1,): shadow samples finished per exit and how many of them
    disagreed. The null is the calibration's *upper* count (see the module docstring).
    """
    answered = expectation.answered.astype(np.float64)
    upper = expectation.upper.astype(np.float64)
    c = float(answered.sum())
    m = np.asarray(samples, dtype=np.float64)
    x = np.asarray(disagreements, dtype=np.float64)
    if c == 0 or m.sum() == 0:
        return math.nan, math.nan
    mix = np.asarray(exits, dtype=np.float64)
    weights = (mix if mix.sum() > 0 else m) / (mix.sum() if mix.sum() > 0 else m.sum())  # (E-1,) live mix
    shrunk = (upper + 0.5) / (answered + 1.0)  # (E-1,) per-exit null rate, never exactly 0 or 1
    seen = m > 0
    rate = np.where(seen, x / np.maximum(m, 1.0), shrunk)  # (E-1,) no sample: no evidence either way
    live = float(np.dot(weights, rate))
    expected = float(upper.sum()) / c
    pooled = (float(upper.sum()) + 0.5) / (c + 1.0)
    variance = float(np.sum(np.where(seen, weights**2 * shrunk * (1.0 - shrunk) / np.maximum(m, 1.0), 0.0)))
    variance += pooled * (1.0 - pooled) / c
    return (live - expected) / math.sqrt(variance), live


# --------------------------------------------------------------------------------------------------
# the monitor (the scheduler's ShadowSink)
# --------------------------------------------------------------------------------------------------
class ShadowObserver(Protocol):
    """Who hears of the monitor (service.http.metrics); stages are 0-based."""

    def on_shadow_samples(self, stage: int, samples: int, disagreements: int) -> None: ...

    def on_shadow_shed(self, stage: int, count: int) -> None: ...

    def on_global_exits(self, stage: int, count: int) -> None: ...

    def set_shadow_expectation(self, expectation: Expectation | None) -> None: ...

    def set_drift(self, z: float, live: float) -> None: ...

    def set_drift_level(self, level: int) -> None: ...


@dataclass(frozen=True)
class WindowResult:
    """One completed drift window."""

    thresholds: ThresholdResult  # the point its samples were answered at
    z: float
    live: float  # live disagreement rate among early-exited images
    expected: float | None  # the calibration's (upper) rate among early-exited images
    samples: int


class ShadowMonitor:
    """Counts shadow results, keeps the window of the point in force and tests it (event loop only)."""

    def __init__(
        self,
        num_stages: int,
        calibration: CalibrationData | None,
        observer: ShadowObserver | None = None,
        *,
        window: int = DRIFT_WINDOW,
    ) -> None:
        if window < 1:
            raise ValueError("the drift window needs at least one sample")
        self.num_stages = num_stages
        self.calibration = calibration
        self.observer = observer
        self.window = int(window)
        self.listeners: list[Callable[[WindowResult], None]] = []
        self._point: ThresholdResult | None = None
        self.expectation: Expectation | None = None
        self._cache: dict[tuple[float, ...], Expectation] = {}
        self._reset()
        self.last: WindowResult | None = None

    def _reset(self) -> None:
        early = max(self.num_stages - 1, 0)
        self._exits = np.zeros(early, dtype=np.int64)
        self._samples = np.zeros(early, dtype=np.int64)
        self._disagreements = np.zeros(early, dtype=np.int64)

    def point(self, thresholds: ThresholdResult) -> None:
        """The thresholds in force for the global budget changed: new expectation, new window."""
        if self._point is not None and (thresholds is self._point or thresholds == self._point):
            return
        self._point = thresholds
        self._reset()
        self.expectation = None
        if self.calibration is not None:
            key = thresholds.thresholds
            hit = self._cache.get(key)
            if hit is None:
                if len(self._cache) >= 64:
                    self._cache.clear()
                hit = self._cache[key] = expected_disagreement(self.calibration, thresholds.thresholds)
            self.expectation = hit
        if self.observer is not None:
            self.observer.set_shadow_expectation(self.expectation)

    def _current(self, tag: object) -> bool:
        return tag is self._point or (self._point is not None and tag == self._point)

    # -- ShadowSink ------------------------------------------------------------------------------------
    def on_eligible_exits(self, stage: int, count: int, tag: object) -> None:
        if self.observer is not None:
            self.observer.on_global_exits(stage, count)
        if stage < self.num_stages - 1 and self._current(tag):
            self._exits[stage] += count

    def on_shadow(self, stage: int, disagree: np.ndarray, tag: object) -> None:
        m = len(disagree)
        x = int(np.count_nonzero(disagree))
        if self.observer is not None:
            self.observer.on_shadow_samples(stage, m, x)
        if not self._current(tag):  # answered at an earlier point: not this window's expectation
            return
        self._samples[stage] += m
        self._disagreements[stage] += x
        if int(self._samples.sum()) >= self.window:
            self._close_window()

    def on_shadow_shed(self, stage: int, count: int) -> None:
        if self.observer is not None:
            self.observer.on_shadow_shed(stage, count)

    def _close_window(self) -> None:
        point = self._point
        assert point is not None  # samples are counted only for the point in force
        exp = self.expectation
        if exp is None:
            z, live = math.nan, math.nan
        else:
            z, live = drift_statistic(exp, self._exits, self._samples, self._disagreements)
        result = WindowResult(point, z, live, None if exp is None else exp.early_rate(), int(self._samples.sum()))
        self._reset()
        self.last = result
        if self.observer is not None:
            self.observer.set_drift(z, live)
        for listener in list(self.listeners):
            try:
                listener(result)
            except Exception:  # a listener must never break the scheduler's callback
                log.exception("drift window listener failed")


# --------------------------------------------------------------------------------------------------
# tightening
# --------------------------------------------------------------------------------------------------
class DriftTightener:
    """The level of tightening, from one window's z at a time (a pure state machine)."""

    def __init__(self, max_level: int = MAX_LEVEL, relax_windows: int = RELAX_WINDOWS) -> None:
        self.max_level = max_level
        self.base_relax = relax_windows
        self.reset()

    def reset(self) -> None:
        self.level = 0
        self.relax_after = self.base_relax
        self.calm = 0
        self._just_relaxed = False

    def decide(self, z: float) -> int:
        """The level after a window with statistic z (NaN: no evidence, nothing changes)."""
        if math.isnan(z):
            return self.level
        if z > DRIFT_Z:
            if self._just_relaxed:  # the step back drifted at once: wait longer before the next one
                self.relax_after = min(2 * self.relax_after, MAX_RELAX_WINDOWS)
            self.level = min(self.level + 1, self.max_level)
            self.calm = 0
            self._just_relaxed = False
            return self.level
        self._just_relaxed = False
        if z < RELAX_Z:
            self.calm += 1
            if self.level > 0 and self.calm >= self.relax_after:
                self.level -= 1
                self.calm = 0
                self._just_relaxed = True
        else:
            self.calm = 0
        return self.level


def drift_budget(base: Budget, level: int) -> Budget | None:
    """The budget served at tightening `level` of the global budget `base` (None: `base` itself)."""
    if level <= 0 or base.kind != "max_accuracy_drop":
        return None
    return Budget(base.kind, float(base.value) / 2.0**level, base.policy, base.confidence)


class DriftControl:
    """Drives `DriftTightener` from the monitor's windows and applies it through the live layer."""

    def __init__(
        self,
        live: LiveOperatingPoint,
        resolver: BudgetResolver,
        monitor: ShadowMonitor,
        tightener: DriftTightener | None = None,
    ) -> None:
        self.live = live
        self.resolver = resolver
        self.monitor = monitor
        self.tightener = tightener or DriftTightener()
        self._base: ResolvedBudget | None = None
        monitor.listeners.append(self.on_window)
        live.subscribe(self._on_point)

    @property
    def level(self) -> int:
        return self.tightener.level

    def _on_point(self, current: ResolvedBudget) -> None:
        if self.live.base is not self._base:  # a new global budget: its adjustments were dropped
            self._base = self.live.base
            self.tightener.reset()
            self._publish()
        self.monitor.point(current.thresholds)

    def _tightenable(self) -> bool:
        base = self.live.base
        return base.early_exit and base.budget.kind == "max_accuracy_drop"

    def on_window(self, result: WindowResult) -> None:
        if not self._tightenable():
            return
        before = self.tightener.level
        after = self.tightener.decide(result.z)
        if after == before:
            return
        if after > before:
            after = self._next_more_expensive(before, after)
            self.tightener.level = after
        budget = drift_budget(self.live.base.budget, after)
        try:
            self.live.adjust(DRIFT_OWNER, budget)
        except InvalidBudgetError as exc:  # cannot happen for a smaller drop of a valid budget; be safe
            log.error("drift tightening to level %d failed: %s", after, exc)
            return
        log.warning(
            "shadow monitor: live disagreement %.4f vs expected %.4f (z = %.2f): drift level %d -> %d",
            result.live,
            result.expected if result.expected is not None else math.nan,
            result.z,
            before,
            after,
        )
        self._publish()

    def _next_more_expensive(self, before: int, wanted: int) -> int:
        """`wanted`, or the first deeper level whose point costs more than `before`'s (levels that
        certify the same point would only waste a window each)."""
        base = self.live.base.budget
        now = self._macs(drift_budget(base, before) or base)
        level = wanted
        while level < self.tightener.max_level and self._macs(drift_budget(base, level) or base) <= now:
            level += 1
        return level

    def _macs(self, budget: Budget) -> float:
        macs = self.resolver.resolve(budget).expected_macs
        return math.inf if macs is None else float(macs)

    def _publish(self) -> None:
        if self.monitor.observer is not None:
            self.monitor.observer.set_drift_level(self.tightener.level)
