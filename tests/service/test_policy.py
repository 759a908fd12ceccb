"""Threshold policies on hand-computed and seeded synthetic calibration data."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from service.core import policies as P
from service.core.artifact import CalibrationData
from service.core.errors import InvalidBudgetError
from service.core.exit_rule import exit_indices
from tests.fixtures.synthetic_calibration import PAPER_ANYTIME_MACS, synthetic_calibration


def f32(x: float) -> float:
    return float(np.float32(x))


def make_cal(conf: list[list[float]], correct: list[list[int]], macs: list[float]) -> CalibrationData:
    return CalibrationData(
        confidence=np.asarray(conf, dtype=np.float32),
        correct=np.asarray(correct, dtype=bool),
        cumulative_macs=np.asarray(macs, dtype=np.float64),
    )


def naive_reference(cal: CalibrationData, probs: list[float] | tuple[float, ...]) -> list[float]:
    """The boostnet.md loop written the obvious way (np.sort on every exit)."""
    n = cal.num_samples
    remaining = np.ones(n, dtype=bool)
    thresholds = [math.inf] * cal.num_exits
    for k in range(cal.num_exits - 1):
        m = math.floor(n * probs[k])
        c = np.sort(cal.confidence[k][remaining])[::-1]
        thresholds[k] = float(c[m - 1]) if 1 <= m <= len(c) else math.inf
        remaining &= cal.confidence[k] < np.float32(thresholds[k])
    thresholds[-1] = -math.inf
    return thresholds


def naive_evaluate(cal: CalibrationData, thresholds: list[float] | tuple[float, ...]) -> tuple[float, float]:
    correct = 0
    macs = 0.0
    for i in range(cal.num_samples):
        k = next(
            (k for k in range(cal.num_exits - 1) if cal.confidence[k, i] >= np.float32(thresholds[k])),
            cal.num_exits - 1,
        )
        correct += int(cal.correct[k, i])
        macs += float(cal.cumulative_macs[k])
    return correct / cal.num_samples, macs / cal.num_samples


# A 3-exit, 4-sample set with a tie at 0.8 on exit 1.
TINY = make_cal(
    conf=[[0.9, 0.8, 0.8, 0.3], [0.95, 0.7, 0.6, 0.5], [0.99, 0.9, 0.9, 0.9]],
    correct=[[1, 0, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1]],
    macs=[10.0, 20.0, 30.0],
)


# ------------------------------------------------------------------------------------------------
# reference algorithm
# ------------------------------------------------------------------------------------------------
def test_reference_thresholds_hand_computed_with_tie() -> None:
    # k=0: m = floor(4*0.5) = 2 -> T0 = 2nd highest = 0.8; the tie at 0.8 makes 3 samples exit.
    # k=1: m = floor(4*0.25) = 1 over the 1 remaining sample (conf 0.5) -> T1 = 0.5.
    assert P.reference_thresholds(TINY, [0.5, 0.25, 0.25]) == (f32(0.8), f32(0.5), -math.inf)
    result = P.evaluate_thresholds(TINY, [f32(0.8), f32(0.5), -math.inf])
    assert result.exit_fractions == (0.75, 0.25, 0.0)
    assert result.expected_accuracy == 0.75  # exit 1: correct, wrong, correct; sample 4 at exit 2: correct
    assert result.expected_macs == pytest.approx(12.5)


def test_reference_thresholds_m_zero_and_m_beyond_remaining() -> None:
    # m = floor(4 * 0.1) = 0 -> +inf at exit 1; exit 2: m = 2 of 4 remaining -> 2nd highest (0.7).
    assert P.reference_thresholds(TINY, [0.1, 0.5, 0.4]) == (math.inf, f32(0.7), -math.inf)
    # exit 1 takes 3 (tie); exit 2 asks m = 2 but only 1 sample remains -> +inf.
    assert P.reference_thresholds(TINY, [0.5, 0.5, 0.0]) == (f32(0.8), math.inf, -math.inf)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_thresholds_match_naive_loop(seed: int) -> None:
    cal = synthetic_calibration(6, 700, seed)
    # quantised confidences: plenty of ties
    tied = CalibrationData(np.round(cal.confidence * 20) / 20, cal.correct, cal.cumulative_macs)
    for data in (cal, tied):
        for probs in [*P.reference_family_probs(6)[::5], P.geometric_exit_probs(0.3, 6)]:
            assert list(P.reference_thresholds(data, probs)) == naive_reference(data, probs)


def test_reference_family_is_the_39_point_sweep() -> None:
    cal = synthetic_calibration(5, 400, 3)
    family = P.reference_family(cal)
    assert len(family) == 39
    probs = P.reference_family_probs(5)
    assert probs[19] == pytest.approx((0.2,) * 5)  # q = 1: uniform
    assert all(sum(p) == pytest.approx(1.0) for p in probs)
    for point, p in zip(family, probs, strict=True):
        assert point.thresholds == P.reference_thresholds(cal, p)
        assert point.policy == "reference"


def test_flat_curve_keeps_earlier_thresholds() -> None:
    a = P.ThresholdResult((0.9, -math.inf), 0.70, 10.0, (0.5, 0.5), "reference")
    b = P.ThresholdResult((0.5, -math.inf), 0.69, 12.0, (0.6, 0.4), "reference")
    c = P.ThresholdResult((0.3, -math.inf), 0.75, 15.0, (0.7, 0.3), "reference")
    assert P.flat_curve([c, b, a]) == [a, a, c]


def test_eq9_solves_for_p_with_incremental_costs() -> None:
    macs = list(PAPER_ANYTIME_MACS)
    inc = np.diff([0.0, *macs])
    for budget in (16e6, 30e6, 60e6, 100e6, 121e6):
        p = P.eq9_exit_probability(macs, budget)
        assert 0.0 <= p <= 1.0
        c_avg = sum((1 - p) ** n * inc[n] for n in range(len(inc)))
        assert c_avg == pytest.approx(budget, rel=1e-9)
        probs = P.geometric_exit_probs(p, len(macs))
        assert sum(probs) == pytest.approx(1.0)
        assert float(np.dot(probs, macs)) == pytest.approx(budget, rel=1e-9)  # same thing, per exit
    assert P.eq9_exit_probability(macs, macs[-1]) == 0.0
    assert P.eq9_exit_probability(macs, 1e12) == 0.0
    assert P.eq9_exit_probability(macs, macs[0]) == 1.0


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def test_evaluate_matches_brute_force() -> None:
    cal = synthetic_calibration(4, 300, 7)
    rng = np.random.default_rng(0)
    for _ in range(5):
        thresholds = [*rng.uniform(0.3, 1.0, 3).tolist(), -math.inf]
        result = P.evaluate_thresholds(cal, thresholds)
        accuracy, macs = naive_evaluate(cal, thresholds)
        assert result.expected_accuracy == pytest.approx(accuracy, abs=1e-12)
        assert result.expected_macs == pytest.approx(macs, rel=1e-12)
        assert result.exit_fractions is not None
        assert sum(result.exit_fractions) == pytest.approx(1.0)


def test_evaluate_last_exit_always_answers_and_length_checked() -> None:
    never = P.evaluate_thresholds(TINY, [math.inf, math.inf, math.inf])
    assert never.exit_fractions == (0.0, 0.0, 1.0)
    assert never.thresholds[-1] == -math.inf
    with pytest.raises(InvalidBudgetError, match="3 thresholds"):
        P.evaluate_thresholds(TINY, [0.5, -math.inf])


def test_threshold_result_json_and_array() -> None:
    result = P.evaluate_thresholds(TINY, [math.inf, f32(0.7), -math.inf])
    data = result.to_json()
    assert data["thresholds"][0] is None and data["thresholds"][-1] == 0.0
    assert np.float32(data["thresholds"][1]) == np.float32(0.7)  # round-trips to the same float32
    assert sum(data["exit_fractions"]) == pytest.approx(1.0)
    array = result.as_array()
    assert array.dtype == np.float32 and array[0] == np.inf and array[-1] == -np.inf


# ------------------------------------------------------------------------------------------------
# optimal budget_macs
# ------------------------------------------------------------------------------------------------
# 2 exits, conf of exit 1 = 0.9 > 0.8 > 0.7 > 0.6, correct at exit 1 = 1,0,1,0; exit 2 always right.
# j samples exit early (cut after the j-th highest): (acc, MACs) = j=4 (2/4, 10), j=3 (3/4, 12.5),
# j=2 (3/4, 15), j=1 (4/4, 17.5), j=0 (4/4, 20). Pareto: (10, .5), (12.5, .75), (17.5, 1.0).
TWO = make_cal(conf=[[0.9, 0.8, 0.7, 0.6], [1, 1, 1, 1]], correct=[[1, 0, 1, 0], [1, 1, 1, 1]], macs=[10, 20])


@pytest.mark.parametrize(
    ("budget", "threshold", "accuracy", "macs"),
    [(10.0, 0.6, 0.5, 10.0), (12.0, 0.6, 0.5, 10.0), (15.0, 0.7, 0.75, 12.5), (17.5, 0.9, 1.0, 17.5)],
)
def test_optimal_hand_computed(budget: float, threshold: float, accuracy: float, macs: float) -> None:
    result = P.budget_macs(TWO, budget)
    assert result.thresholds == (f32(threshold), -math.inf)
    assert result.expected_accuracy == accuracy
    assert result.expected_macs == pytest.approx(macs)
    assert result.policy == "optimal"


def test_optimal_full_budget_and_clamp() -> None:
    assert P.budget_macs(TWO, 20.0).expected_accuracy == 1.0
    clamped = P.budget_macs(TWO, 1e9)
    assert clamped == P.budget_macs(TWO, 20.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0, 9.99, "abc"])
def test_invalid_budget_macs(bad: object) -> None:
    with pytest.raises(InvalidBudgetError):
        P.budget_macs(TWO, bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidBudgetError):
        P.budget_macs(TWO, bad, "reference")  # type: ignore[arg-type]


def test_below_first_exit_message() -> None:
    with pytest.raises(InvalidBudgetError, match="below the cost of the first exit"):
        P.budget_macs(TWO, 5.0)


def test_unknown_policy() -> None:
    with pytest.raises(InvalidBudgetError, match="policy"):
        P.budget_macs(TWO, 15.0, "greedy")


def _budgets(cal: CalibrationData, count: int = 40) -> np.ndarray:
    return np.linspace(float(cal.cumulative_macs[0]), float(cal.cumulative_macs[-1]), count)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_optimal_monotone_within_budget_and_beats_reference_family(seed: int) -> None:
    cal = synthetic_calibration(8, 1500, seed)
    family = P.reference_family(cal)
    frontier = P.optimal_frontier(cal)
    previous = -1.0
    gains = []
    for budget in _budgets(cal):
        result = P.budget_macs(cal, float(budget))
        assert result.expected_macs is not None and result.expected_accuracy is not None
        assert result.expected_macs <= budget * (1 + 1e-9)
        # the frontier part is monotone (more budget never hurts); the answer is never below it
        on_frontier = max(
            r.expected_accuracy or 0.0 for r in frontier if (r.expected_macs or 0.0) <= budget * (1 + 1e-9)
        )
        assert on_frontier >= previous and result.expected_accuracy >= on_frontier
        previous = on_frontier
        # the reference family at this budget, flat-curve rule: best point that fits
        fitting = [r.expected_accuracy for r in family if r.expected_macs is not None and r.expected_macs <= budget]
        best_reference = max((a for a in fitting if a is not None), default=0.0)
        assert result.expected_accuracy >= best_reference
        gains.append(result.expected_accuracy - best_reference)
        # consistent with a fresh evaluation of its own thresholds (ties included)
        again = P.evaluate_thresholds(cal, result.thresholds)
        assert again.expected_accuracy == result.expected_accuracy
        assert again.expected_macs == pytest.approx(result.expected_macs, rel=1e-12)
    assert max(gains) > 0.005  # strictly better somewhere (by > half a point)


def test_optimal_beats_eq9_reference_on_average() -> None:
    cal = synthetic_calibration(10, 2000, 5)
    diffs = []
    for budget in _budgets(cal, 30)[1:]:
        optimal = P.budget_macs(cal, float(budget))
        reference = P.budget_macs(cal, float(budget), "reference")
        assert reference.expected_macs is not None and reference.expected_macs <= budget * (1 + 1e-9)
        assert optimal.expected_accuracy is not None and reference.expected_accuracy is not None
        diffs.append(optimal.expected_accuracy - reference.expected_accuracy)
    assert np.mean(diffs) > 0.0


@pytest.mark.parametrize(("exits", "seed"), [(4, 2), (4, 3), (6, 4)])
def test_optimal_never_below_eq9_at_the_exact_budget(exits: int, seed: int) -> None:
    """The frontier is a finite set; the answer also weighs the Eq. 9 point of the exact budget
    (the frontier alone falls below it at 3, 3 and 4 of these 59 budgets)."""
    cal = synthetic_calibration(exits, 2000, seed)
    for budget in _budgets(cal, 60)[1:]:
        optimal = P.budget_macs(cal, float(budget))
        reference = P.budget_macs(cal, float(budget), "reference")
        assert optimal.expected_accuracy is not None and reference.expected_accuracy is not None
        assert optimal.expected_accuracy >= reference.expected_accuracy
        assert optimal.expected_macs is not None and optimal.expected_macs <= budget * (1 + 1e-9)
        assert optimal.policy == "optimal"


def test_optimal_with_many_ties_is_consistent() -> None:
    base = synthetic_calibration(5, 800, 11)
    cal = CalibrationData(np.round(base.confidence * 10) / 10, base.correct, base.cumulative_macs)
    for budget in _budgets(cal, 12):
        result = P.budget_macs(cal, float(budget))
        accuracy, macs = naive_evaluate(cal, result.thresholds)
        assert result.expected_accuracy == pytest.approx(accuracy)
        assert result.expected_macs == pytest.approx(macs)
        assert macs <= budget * (1 + 1e-9)


def test_optimal_is_deterministic_across_copies() -> None:
    cal = synthetic_calibration(6, 1000, 4)
    copy = CalibrationData(cal.confidence.copy(), cal.correct.copy(), cal.cumulative_macs.copy())
    assert [r.thresholds for r in P.optimal_frontier(cal)] == [r.thresholds for r in P.optimal_frontier(copy)]
    for budget in _budgets(cal, 7):
        assert P.budget_macs(cal, float(budget)) == P.budget_macs(copy, float(budget))


def test_frontier_is_pareto() -> None:
    frontier = P.optimal_frontier(synthetic_calibration(6, 1000, 8))
    macs = [r.expected_macs for r in frontier]
    accuracy = [r.expected_accuracy for r in frontier]
    assert macs == sorted(macs)
    assert all(a < b for a, b in itertools.pairwise(accuracy))


def test_timing_sanity_e10_n5000() -> None:
    """Generous bounds only (shared CI machines); measured numbers live in docs/policies.md."""
    cal = synthetic_calibration(10, 5000, 0)
    start = time.perf_counter()
    P.budget_macs(cal, 40e6)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    P.budget_macs(cal, 45e6)
    warm = time.perf_counter() - start
    assert cold < 2.0
    assert warm < 0.05


# ------------------------------------------------------------------------------------------------
# max_accuracy_drop
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), "x"])
def test_max_accuracy_drop_invalid(bad: object) -> None:
    with pytest.raises(InvalidBudgetError, match="max_accuracy_drop"):
        P.max_accuracy_drop(TWO, bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# max_exit and explicit
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_max_exit_semantics(k: int) -> None:
    result = P.max_exit(TINY, k, 3)
    assert result.thresholds == (*([math.inf] * (k - 1)), *([-math.inf] * (4 - k)))
    assert result.final_exit == k - 1
    expected = [0.0, 0.0, 0.0]
    expected[k - 1] = 1.0
    assert result.exit_fractions == tuple(expected)
    assert result.expected_accuracy == pytest.approx(float(TINY.correct[k - 1].mean()))
    assert result.expected_macs == TINY.cumulative_macs[k - 1]
    # the engine rule (first k with conf >= T[k]) sends every sample to exit k, whatever its confidence
    exits = exit_indices(np.random.default_rng(0).random((3, 50)).astype(np.float32), result.thresholds)
    assert (exits == k - 1).all()
    assert result.to_json()["thresholds"] == [*([None] * (k - 1)), *([0.0] * (4 - k))]


def test_max_exit_without_calibration_and_errors() -> None:
    bare = P.max_exit(None, 2, 4)
    assert bare.thresholds == (math.inf, -math.inf, -math.inf, -math.inf)
    assert bare.expected_accuracy is None and bare.exit_fractions is None
    for bad in (0, 5, -1):
        with pytest.raises(InvalidBudgetError, match="between 1 and 4"):
            P.max_exit(None, bad, 4)
    with pytest.raises(InvalidBudgetError):
        P.max_exit(None, True, 4)
    with pytest.raises(InvalidBudgetError, match="exits"):
        P.max_exit(TINY, 1, 4)


def test_explicit_normalises_and_evaluates() -> None:
    result = P.explicit(TINY, [None, 0.6, 0.99])
    assert result.thresholds == (math.inf, 0.6, -math.inf)
    accuracy, macs = naive_evaluate(TINY, result.thresholds)
    assert result.expected_accuracy == accuracy and result.expected_macs == pytest.approx(macs)
    assert P.explicit(TINY, [1.5, math.inf, None]).thresholds == (math.inf, math.inf, -math.inf)
    assert P.explicit(TINY, [0.0, 0.5, 0.5]).exit_fractions == (1.0, 0.0, 0.0)
    bare = P.explicit(None, [0.9, None], num_exits=2)
    assert bare.thresholds == (0.9, -math.inf) and bare.expected_macs is None


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([0.5, 0.5], "one value per exit"),
        ([-0.1, 0.5, 0.5], "threshold 1"),
        ([0.5, float("nan"), 0.5], "threshold 2"),
        ([0.5, -math.inf, 0.5], "threshold 2"),
        (["x", 0.5, 0.5], "threshold 1"),
    ],
)
def test_explicit_invalid(values: list[object], match: str) -> None:
    with pytest.raises(InvalidBudgetError, match=match):
        P.explicit(TINY, values)  # type: ignore[arg-type]


def test_explicit_without_calibration_needs_num_exits() -> None:
    with pytest.raises(InvalidBudgetError, match="num_exits"):
        P.explicit(None, [0.5, None])
