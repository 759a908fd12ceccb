"""The shadow monitor: calibrated expectation, drift statistic, windows, counters, drift tightening.

Live traffic is simulated by feeding the monitor what the scheduler would (eligible exits per
exit, shadow samples with their disagreement flags), drawn with fixed seeds: no timing, no engine.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from service.core.budget import BudgetResolver, ResolvedBudget
from service.core.exit_rule import exit_indices
from service.core.knobs import Budget
from service.core.live import LiveOperatingPoint
from service.core.shadow import (
    DRIFT_OWNER,
    DRIFT_Z,
    RELAX_WINDOWS,
    DriftControl,
    DriftTightener,
    Expectation,
    ShadowMonitor,
    drift_budget,
    drift_statistic,
    expected_disagreement,
)
from tests.fixtures.synthetic_calibration import synthetic_calibration
from tests.service.test_thresholds_cli import build_manifest

CAL = synthetic_calibration(4, 3000, 9, cumulative_macs=[10e6, 20e6, 30e6, 40e6])
MANIFEST = build_manifest(CAL)
BASE = Budget.of(max_accuracy_drop=0.05)
WINDOW = 400


class Recorder:
    """A ShadowObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.samples: dict[int, int] = {}
        self.disagreements: dict[int, int] = {}
        self.shed: dict[int, int] = {}
        self.exits: dict[int, int] = {}
        self.expectations: list[Expectation | None] = []
        self.drift: list[tuple[float, float]] = []
        self.levels: list[int] = []

    def on_shadow_samples(self, stage: int, samples: int, disagreements: int) -> None:
        self.samples[stage] = self.samples.get(stage, 0) + samples
        self.disagreements[stage] = self.disagreements.get(stage, 0) + disagreements

    def on_shadow_shed(self, stage: int, count: int) -> None:
        self.shed[stage] = self.shed.get(stage, 0) + count

    def on_global_exits(self, stage: int, count: int) -> None:
        self.exits[stage] = self.exits.get(stage, 0) + count

    def set_shadow_expectation(self, expectation: Expectation | None) -> None:
        self.expectations.append(expectation)

    def set_drift(self, z: float, live: float) -> None:
        self.drift.append((z, live))

    def set_drift_level(self, level: int) -> None:
        self.levels.append(level)


def _same(a: Expectation | None, b: Expectation) -> bool:
    return a is not None and all(
        np.array_equal(getattr(a, f), getattr(b, f)) for f in ("answered", "upper", "lower", "exact")
    )


def test_expectation_counts_are_the_bounds_of_the_held_out_disagreement() -> None:
    resolver = BudgetResolver(MANIFEST, CAL)
    thresholds = resolver.resolve(BASE).thresholds
    exp = expected_disagreement(CAL, thresholds)
    exits = exit_indices(CAL.confidence, thresholds)
    right = CAL.correct
    for k in range(CAL.num_exits - 1):
        at = np.flatnonzero(exits == k)
        assert exp.answered[k] == at.size
        assert exp.upper[k] == sum(1 for i in at if not (right[k, i] and right[-1, i]))
        assert exp.lower[k] == sum(1 for i in at if right[k, i] != right[-1, i])
    assert exp.early == int(np.count_nonzero(exits < CAL.num_exits - 1)) > 0
    assert np.all(exp.lower <= exp.upper)
    # With the exits' labels known, both counts are the exact disagreements.
    rng = np.random.default_rng(0)
    agrees = rng.random(CAL.confidence.shape) < 0.9
    exact = expected_disagreement(CAL, thresholds, agrees)
    assert exact.exact and np.array_equal(exact.upper, exact.lower)
    for k in range(CAL.num_exits - 1):
        assert exact.upper[k] == int(np.count_nonzero(~agrees[k][exits == k]))


def _window(
    exp: Expectation, rates: np.ndarray, seed: int, samples: int = WINDOW, mix: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(eligible exits, samples, disagreements) per early exit for one simulated window."""
    rng = np.random.default_rng(seed)
    shares = exp.answered / exp.answered.sum() if mix is None else mix
    m = rng.multinomial(samples, shares)
    x = rng.binomial(m, rates)
    return m * 100, m, x


def test_drift_statistic_is_calm_at_the_calibrated_rates_and_large_under_drift() -> None:
    exp = expected_disagreement(CAL, BudgetResolver(MANIFEST, CAL).resolve(BASE).thresholds)
    lower = exp.lower / np.maximum(exp.answered, 1)
    upper = exp.upper / np.maximum(exp.answered, 1)
    null = [drift_statistic(exp, *_window(exp, lower, seed))[0] for seed in range(200)]
    assert max(null) < DRIFT_Z  # the truth lies between the bounds; the test's null is the upper one
    at_upper = [drift_statistic(exp, *_window(exp, upper, seed))[0] for seed in range(400)]
    assert np.mean(np.asarray(at_upper) > DRIFT_Z) < 0.02  # at the boundary: about the nominal level
    drifted = np.minimum(1.0, upper * 1.6 + 0.05)
    assert all(drift_statistic(exp, *_window(exp, drifted, seed))[0] > DRIFT_Z for seed in range(50))
    # A mix shift towards the exit that disagrees most is drift even at unchanged per-exit rates.
    worst = int(np.argmax(upper))
    mix = np.full(len(upper), 0.02)
    mix[worst] = 1.0 - 0.02 * (len(upper) - 1)
    z, live = drift_statistic(exp, *_window(exp, upper, 1, samples=4000, mix=mix))
    assert z > DRIFT_Z and live > exp.early_rate()  # type: ignore[operator]
    assert math.isnan(drift_statistic(exp, np.zeros(3), np.zeros(3), np.zeros(3))[0])


def _feed(monitor: ShadowMonitor, tag: object, rates: np.ndarray, windows: int, seed: int) -> None:
    exp = monitor.expectation
    assert exp is not None
    for w in range(windows):
        exits, m, x = _window(exp, rates, seed * 1000 + w)
        for k in range(len(m)):
            monitor.on_eligible_exits(k, int(exits[k]), tag)
        for k in range(len(m)):
            flags = np.zeros(int(m[k]), dtype=bool)
            flags[: int(x[k])] = True
            monitor.on_shadow(k, flags, tag)


def test_monitor_counts_every_sample_and_tests_only_the_point_in_force() -> None:
    resolver = BudgetResolver(MANIFEST, CAL)
    point = resolver.resolve(BASE)
    recorder = Recorder()
    monitor = ShadowMonitor(CAL.num_exits, CAL, recorder, window=WINDOW)
    monitor.point(point)
    assert _same(recorder.expectations[-1], expected_disagreement(CAL, point.thresholds))
    stale = resolver.resolve(Budget.of(max_accuracy_drop=0.1))
    monitor.on_shadow(0, np.ones(WINDOW, dtype=bool), stale)  # answered at another point: counted, not tested
    monitor.on_eligible_exits(3, 7, point)
    assert recorder.samples == {0: WINDOW} and recorder.disagreements == {0: WINDOW} and recorder.exits == {3: 7}
    assert recorder.drift == [] and monitor.last is None
    monitor.on_shadow(1, np.zeros(WINDOW - 1, dtype=bool), point)
    assert recorder.drift == []
    monitor.on_shadow(1, np.zeros(1, dtype=bool), point)  # the window is full: one test
    assert len(recorder.drift) == 1 and recorder.drift[0][0] < 0 and monitor.last is not None
    monitor.on_shadow_shed(2, 3)
    assert recorder.shed == {2: 3}


def _control(window: int = WINDOW) -> tuple[LiveOperatingPoint, ShadowMonitor, DriftControl, Recorder]:
    resolver = BudgetResolver(MANIFEST, CAL)
    live = LiveOperatingPoint(resolver, ResolvedBudget(BASE, resolver.resolve(BASE), True))
    recorder = Recorder()
    monitor = ShadowMonitor(CAL.num_exits, CAL, recorder, window=window)
    return live, monitor, DriftControl(live, resolver, monitor), recorder


def _rates(monitor: ShadowMonitor, bound: str) -> np.ndarray:
    exp = monitor.expectation
    assert exp is not None
    counts = exp.upper if bound == "upper" else exp.lower
    return counts / np.maximum(exp.answered, 1)


def test_no_drift_keeps_the_certified_point() -> None:
    live, monitor, control, recorder = _control()
    for seed in range(30):
        _feed(monitor, live.current.thresholds, _rates(monitor, "lower"), 1, seed)
    assert len(recorder.drift) == 30 and control.level == 0
    assert live.current is live.base and live.adjustment(DRIFT_OWNER) is None


def test_drift_tightens_to_more_expensive_points_until_back_within_expectation_then_relaxes() -> None:
    live, monitor, control, recorder = _control()
    base_macs = live.base.thresholds.expected_macs
    assert base_macs is not None
    # Drift: every early exit disagrees far more than the calibration's upper count allows. The
    # drifted traffic disagrees in the same way at every point, so the level climbs window by window.
    _feed(monitor, live.current.thresholds, np.minimum(1.0, _rates(monitor, "upper") * 2 + 0.1), 1, 0)
    assert control.level >= 1
    first = live.current
    assert first.effective == drift_budget(BASE, control.level) and first.budget == BASE
    assert first.thresholds.expected_macs is not None and first.thresholds.expected_macs > base_macs
    assert _same(monitor.expectation, expected_disagreement(CAL, first.thresholds.thresholds))  # new point, new window
    # Back within expectation at the tightened point: it stays there (no relaxing before the wait).
    for seed in range(RELAX_WINDOWS - 1):
        _feed(monitor, live.current.thresholds, _rates(monitor, "lower"), 1, 100 + seed)
    assert live.current is first
    # Calm for RELAX_WINDOWS windows: one step back; calm for good: back to the certified point.
    for seed in range(RELAX_WINDOWS * (control.level + 1) * 2):
        _feed(monitor, live.current.thresholds, _rates(monitor, "lower"), 1, 200 + seed)
    assert control.level == 0 and live.current is live.base and recorder.levels[-1] == 0
    assert max(recorder.levels) >= 1


def test_persistent_drift_keeps_tightening_and_never_past_the_deepest_level() -> None:
    live, monitor, control, _ = _control()
    macs = [live.current.thresholds.expected_macs]
    for seed in range(15):
        _feed(monitor, live.current.thresholds, np.minimum(1.0, _rates(monitor, "upper") * 2 + 0.2), 1, seed)
        macs.append(live.current.thresholds.expected_macs)
        if monitor.expectation is None or monitor.expectation.early == 0:
            break  # the full network: nothing left to watch
    assert all(b >= a for a, b in itertools.pairwise(macs))  # type: ignore[operator]
    assert control.level <= control.tightener.max_level and macs[-1] > macs[0]  # type: ignore[operator]


def test_a_new_global_budget_starts_untightened() -> None:
    live, monitor, control, recorder = _control()
    _feed(monitor, live.current.thresholds, np.ones(CAL.num_exits - 1), 1, 0)
    assert control.level >= 1
    other = Budget.of(max_accuracy_drop=0.1)
    live.rebase(ResolvedBudget(other, live.resolver.resolve(other), True))
    assert control.level == 0 and recorder.levels[-1] == 0 and live.current is live.base
    assert _same(monitor.expectation, expected_disagreement(CAL, live.base.thresholds.thresholds))


def test_other_budget_kinds_are_watched_but_never_tightened() -> None:
    resolver = BudgetResolver(MANIFEST, CAL)
    macs_budget = Budget.of(budget_macs=25e6)
    live = LiveOperatingPoint(resolver, ResolvedBudget(macs_budget, resolver.resolve(macs_budget), True))
    recorder = Recorder()
    monitor = ShadowMonitor(CAL.num_exits, CAL, recorder, window=WINDOW)
    control = DriftControl(live, resolver, monitor)
    _feed(monitor, live.current.thresholds, np.ones(CAL.num_exits - 1), 2, 0)
    assert recorder.drift and recorder.drift[-1][0] > DRIFT_Z
    assert control.level == 0 and live.current is live.base


def test_tightener_state_machine() -> None:
    t = DriftTightener(max_level=3, relax_windows=2)
    assert t.decide(math.nan) == 0 and t.decide(0.0) == 0
    assert [t.decide(5.0) for _ in range(4)] == [1, 2, 3, 3]  # capped
    assert [t.decide(0.0) for _ in range(2)] == [3, 2]  # two calm windows: one step back
    assert t.decide(2.0) == 2 and t.calm == 0  # neither calm nor drift: the count starts again
    assert t.decide(5.0) == 3  # not right after a step back: the wait stays
    assert t.relax_after == 2
    t.decide(0.0)
    assert t.decide(0.0) == 2  # stepped back ...
    assert t.decide(5.0) == 3 and t.relax_after == 4  # ... and drifted at once: wait twice as long
    assert [t.decide(0.0) for _ in range(4)] == [3, 3, 3, 2]
    t.reset()
    assert (t.level, t.relax_after, t.calm) == (0, 2, 0)


def test_drift_budget_halves_the_allowed_drop_and_keeps_the_refiners() -> None:
    base = Budget.of(max_accuracy_drop=0.02, policy="reference", drop_confidence=0.9)
    assert drift_budget(base, 0) is None
    tight = drift_budget(base, 2)
    assert tight == Budget("max_accuracy_drop", 0.005, "reference", 0.9)
    assert drift_budget(Budget.of(budget_macs=25e6), 3) is None


@pytest.mark.parametrize("window", [0, -1])
def test_window_must_hold_a_sample(window: int) -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        ShadowMonitor(4, CAL, window=window)


def test_the_calibrations_own_noise_is_part_of_the_test() -> None:
    """A small calibration split estimates its rate loosely; a long live window measures the live
    one tightly. Comparing the two as if the calibration were exact would alarm on clean traffic."""
    rng = np.random.default_rng(11)
    rates = np.array([0.05, 0.15, 0.3])  # the population's per-exit disagreement (= the upper count here)
    answered = np.array([60, 60, 60])
    alarms = 0
    draws = 300
    for _ in range(draws):
        counts = rng.binomial(answered, rates)  # this draw's calibration split
        exp = Expectation(answered, counts, counts.copy(), exact=True)
        m = rng.multinomial(6000, answered / answered.sum())
        x = rng.binomial(m, rates)  # live traffic from the same population: no drift
        alarms += drift_statistic(exp, m * 100, m, x)[0] > DRIFT_Z
    assert alarms / draws < 0.02


def test_levels_that_certify_the_same_point_are_skipped() -> None:
    """A smaller drop can certify the very same point (the path is discrete): tightening goes on to
    the first level that costs more, instead of spending a window on a move that changes nothing."""
    control = _control()[2]
    real = control.resolver

    class SamePointTwice:
        """The real resolver, except that level 1 (d / 2) resolves to the base point itself."""

        def resolve(self, budget: Budget) -> object:
            if budget.value == BASE.value / 2:
                return real.resolve(BASE)
            return real.resolve(budget)

    control.resolver = SamePointTwice()  # type: ignore[assignment]
    assert control._next_more_expensive(0, 1) == 2
