"""Threshold policies: turn a compute budget into per-exit confidence thresholds.

Everything here is a pure, deterministic function of the held-out calibration data
(`service.core.artifact.CalibrationData`: confidence (E, n), correct (E, n), cumulative_macs (E,)).
numpy only, so `export/` and the offline tools can use it without the serving stack.

Exit rule (shared with the engine): a sample exits at the first exit k with
``confidence[k] >= thresholds[k]``; the last exit always answers. Threshold values:

* a float in [0, 1]   exit here when the confidence reaches it (ties exit);
* ``math.inf``        never exit here;
* ``-math.inf``       always exit here (the last exit; also every exit from k on for ``max_exit(k)``).

Policies (see docs/policies.md for the why and the measurements):

* :func:`budget_macs` ``policy="reference"`` -- the BoostNet paper: solve Eq. 9 for the exit
  probability p, thresholds by the reference code's held-out loop (:func:`reference_thresholds`),
  plus the reference code's geometric sweep (:func:`reference_family`) and the flat-curve rule.
* :func:`budget_macs` ``policy="optimal"`` -- our optimiser: searches threshold vectors directly
  to maximise held-out accuracy subject to held-out expected MACs <= budget. It is seeded with
  every reference point, so it is never worse than the reference family on held-out data.
* :func:`max_accuracy_drop` -- seed 001's knob: the cheapest thresholds within ``drop`` of the
  final exit's held-out accuracy.
* :func:`max_exit` -- anytime mode: every sample answers at exit k; later stages never run.
* :func:`explicit` -- user-given thresholds, validated and evaluated.

Calibration arrays are treated as immutable: the prepared search state of a `CalibrationData`
object is cached (small LRU by identity) so repeated calls cost a lookup, not a new search.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from service.core.artifact import CalibrationData
from service.core.errors import InvalidBudgetError

__all__ = [
    "REFERENCE_SWEEP",
    "Policy",
    "ThresholdResult",
    "budget_macs",
    "eq9_exit_probability",
    "evaluate_thresholds",
    "explicit",
    "flat_curve",
    "geometric_exit_probs",
    "max_accuracy_drop",
    "max_exit",
    "optimal_frontier",
    "reference_family",
    "reference_thresholds",
    "synthetic_calibration",
]

Policy = Literal["optimal", "reference"]

#: The reference code's sweep: p = 1..39, q = p / 20, probs[k] = q^(k+1) normalised over the exits.
REFERENCE_SWEEP: tuple[int, ...] = tuple(range(1, 40))

_REL_TOL = 1e-9  # relative slack on MAC comparisons (sums of float MACs are not exact)


# --------------------------------------------------------------------------------------------------
# result type
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThresholdResult:
    """Per-exit thresholds plus what they are expected to do on the held-out set.

    ``expected_*`` and ``exit_fractions`` are None when no calibration data was available
    (``max_exit`` / ``explicit`` without calibration). ``expected_macs`` is the average per image.
    """

    thresholds: tuple[float, ...]
    expected_accuracy: float | None
    expected_macs: float | None
    exit_fractions: tuple[float, ...] | None
    policy: str

    @property
    def num_exits(self) -> int:
        return len(self.thresholds)

    @property
    def final_exit(self) -> int:
        """0-based index of the first exit that always answers (-inf): later stages never run."""
        for k, value in enumerate(self.thresholds):
            if value == -math.inf:
                return k
        return len(self.thresholds) - 1

    def as_array(self) -> np.ndarray:
        """float32 thresholds for the engine (inf/-inf kept; float32 keeps tie semantics exact)."""
        return np.asarray(self.thresholds, dtype=np.float32)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form: +inf -> None ("never exit here"), -inf -> 0.0 ("always exit here").

        Finite thresholds are written with the shortest decimal that round-trips to the same
        float32, so a client that sends them back gets exactly the same exits (ties included);
        rounding them harder would move samples across the threshold.
        """
        thresholds: list[float | None] = []
        for value in self.thresholds:
            if value == math.inf:
                thresholds.append(None)
            elif value == -math.inf:
                thresholds.append(0.0)
            else:
                thresholds.append(_float32_repr(value))
        return {
            "thresholds": thresholds,
            "expected_accuracy": None if self.expected_accuracy is None else round(self.expected_accuracy, 6),
            "expected_macs": None if self.expected_macs is None else round(self.expected_macs, 1),
            "exit_fractions": None if self.exit_fractions is None else [round(f, 6) for f in self.exit_fractions],
            "policy": self.policy,
        }


def _float32_repr(value: float) -> float:
    return float(str(np.float32(value)))


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
def _exit_indices(confidence: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Index of the exit each sample takes: the first k with conf[k] >= T[k]; the last always."""
    num_exits, n = confidence.shape
    exits = np.full(n, num_exits - 1, dtype=np.intp)
    t32 = np.asarray(thresholds, dtype=np.float32)
    for k in range(num_exits - 2, -1, -1):
        exits = np.where(confidence[k] >= t32[k], k, exits)
    return exits


def _result_from_exits(
    cal: CalibrationData, thresholds: Sequence[float], exits: np.ndarray, policy: str
) -> ThresholdResult:
    n = cal.num_samples
    counts = np.bincount(exits, minlength=cal.num_exits)
    fractions = counts / n
    accuracy = float(np.count_nonzero(cal.correct[exits, np.arange(n)])) / n
    macs = float(np.dot(fractions, np.asarray(cal.cumulative_macs, dtype=np.float64)))
    return ThresholdResult(
        thresholds=tuple(float(t) for t in thresholds),
        expected_accuracy=accuracy,
        expected_macs=macs,
        exit_fractions=tuple(float(f) for f in fractions),
        policy=policy,
    )


def evaluate_thresholds(cal: CalibrationData, thresholds: Sequence[float], policy: str = "explicit") -> ThresholdResult:
    """Held-out accuracy, expected MACs and exit fractions of a threshold vector.

    Each sample exits at the first k with ``conf[k] >= T[k]`` (the last exit always answers,
    whatever ``T[-1]`` says); its correctness is that exit's; expected MACs =
    sum_k fraction_k * cumulative_macs[k]. Comparisons are in float32, like the engine.
    """
    if len(thresholds) != cal.num_exits:
        raise InvalidBudgetError(f"need {cal.num_exits} thresholds (one per exit), got {len(thresholds)}")
    values = [float(t) for t in thresholds]
    values[-1] = -math.inf
    return _result_from_exits(cal, values, _exit_indices(cal.confidence, values), policy)


# --------------------------------------------------------------------------------------------------
# reference algorithm (BoostNet code / paper)
# --------------------------------------------------------------------------------------------------
def reference_thresholds(cal: CalibrationData, probs: Sequence[float]) -> tuple[float, ...]:
    """The reference code's held-out loop, verbatim (shared/design/boostnet.md).

    ``m = floor(n * probs[k])`` is counted over all n samples (not the remaining ones); T[k] is the
    m-th highest confidence among the samples still remaining (+inf when m == 0 or m exceeds them);
    samples at or above T[k] exit (ties too); T[N-1] = -inf.
    """
    num_exits, n = cal.num_exits, cal.num_samples
    if len(probs) != num_exits:
        raise InvalidBudgetError(f"need {num_exits} exit probabilities, got {len(probs)}")
    prep = _prepared(cal)
    remaining = np.ones(n, dtype=bool)
    thresholds = [math.inf] * num_exits
    for k in range(num_exits - 1):
        m = math.floor(n * float(probs[k]))
        if m >= 1:
            # c = sort(conf[k][remaining], descending); c[m-1] via the presorted order of exit k
            counts = np.cumsum(remaining[prep.order[k]])
            if m <= counts[-1]:
                thresholds[k] = float(prep.sorted_conf[k][int(np.searchsorted(counts, m))])
        remaining &= cal.confidence[k] < np.float32(thresholds[k])
    thresholds[-1] = -math.inf
    return tuple(thresholds)


def reference_family_probs(num_exits: int) -> list[tuple[float, ...]]:
    """probs for the reference sweep: q = p/20 (p = 1..39), probs[k] = q^(k+1) normalised."""
    family = []
    for p in REFERENCE_SWEEP:
        q = p / 20.0
        raw = [q ** (k + 1) for k in range(num_exits)]
        total = sum(raw)
        family.append(tuple(r / total for r in raw))
    return family


def reference_family(cal: CalibrationData) -> list[ThresholdResult]:
    """The reference code's 39-point sweep, evaluated on the held-out set (in sweep order)."""
    return list(_prepared(cal).reference_points())


def flat_curve(points: Sequence[ThresholdResult]) -> list[ThresholdResult]:
    """The paper's flat-curve rule, for curves and reports.

    Sorted by held-out expected MACs; a point that does not improve held-out accuracy over a
    cheaper one is replaced by the earlier (cheaper) thresholds, so the curve never goes down.
    """
    ordered = sorted(points, key=lambda r: (_macs(r), -_acc(r)))
    out: list[ThresholdResult] = []
    for point in ordered:
        if out and _acc(point) <= _acc(out[-1]):
            out.append(out[-1])
        else:
            out.append(point)
    return out


def geometric_exit_probs(p: float, num_exits: int) -> tuple[float, ...]:
    """Eq. 9's exit distribution: p(1-p)^k at exit k < N-1, the last takes the rest (1-p)^(N-1)."""
    probs = [p * (1.0 - p) ** k for k in range(num_exits - 1)]
    probs.append((1.0 - p) ** (num_exits - 1))
    return tuple(probs)


def eq9_exit_probability(cumulative_macs: Sequence[float] | np.ndarray, macs: float) -> float:
    """Solve Eq. 9, C_avg(p) = sum_n (1-p)^(n-1) C_n = macs, for p in [0, 1].

    C_n is the *incremental* cost of stage n (cumulative_macs differenced). C_avg is decreasing
    in p (C_avg(0) = full cost, C_avg(1) = C_1), so a bracket always exists; Newton-Raphson steps
    are taken when they stay inside the current bracket, bisection otherwise (always converges).
    """
    cum = np.asarray(cumulative_macs, dtype=np.float64)
    inc = np.diff(np.concatenate([[0.0], cum]))
    powers = np.arange(len(inc), dtype=np.float64)

    def f(p: float) -> float:
        return float(np.sum((1.0 - p) ** powers * inc)) - macs

    def df(p: float) -> float:
        return float(-np.sum(powers[1:] * (1.0 - p) ** (powers[1:] - 1.0) * inc[1:]))

    if macs >= cum[-1]:
        return 0.0
    if macs <= inc[0]:
        return 1.0
    lo, hi = 0.0, 1.0  # f(lo) > 0 > f(hi)
    p = 0.5
    for _ in range(200):
        value = f(p)
        if abs(value) <= 1e-12 * max(1.0, macs):
            return p
        if value > 0:
            lo = p
        else:
            hi = p
        slope = df(p)
        step = p - value / slope if slope != 0.0 else math.nan
        p = step if lo < step < hi else 0.5 * (lo + hi)
        if hi - lo < 1e-15:
            break
    return p


# --------------------------------------------------------------------------------------------------
# prepared search state (one per calibration object)
# --------------------------------------------------------------------------------------------------
class _Prepared:
    """Sorted confidences, per-exit ranks and the lazily built frontiers of one calibration set.

    A threshold vector is represented by *cuts*: cut[k] = number of distinct confidence values of
    exit k (ranked high to low) that pass, i.e. T[k] = distinct[k][cut-1] (cut 0: +inf). Samples of
    rank < cut exit, which is exactly ``conf >= T`` with ties included.
    """

    def __init__(self, cal: CalibrationData) -> None:
        self.cal = cal
        self.num_exits = cal.num_exits
        self.n = cal.num_samples
        conf = np.asarray(cal.confidence, dtype=np.float32)
        self.correct = np.asarray(cal.correct, dtype=np.float64)
        self.macs = np.asarray(cal.cumulative_macs, dtype=np.float64)
        self.order: list[np.ndarray] = []
        self.sorted_conf: list[np.ndarray] = []
        self.ranks: list[np.ndarray] = []  # rank of each sample's confidence among distinct values
        self.distinct: list[np.ndarray] = []  # distinct confidences, descending
        # The optimiser prices cuts on a grid of at most _GRID cut positions per exit (bounds[k],
        # exact cuts) plus the current cut: prefix sums over a few hundred bins instead of n
        # samples (float cumsum over n is the hot spot). bins[k] = grid bin of each sample.
        self.bounds: list[np.ndarray] = []
        self.bins: list[np.ndarray] = []
        for k in range(self.num_exits - 1):  # the last exit's confidence never matters
            order = np.argsort(-conf[k], kind="stable")
            values = conf[k][order]
            self.order.append(order)
            self.sorted_conf.append(values)
            new = np.empty(self.n, dtype=bool)
            new[0] = True
            np.not_equal(values[1:], values[:-1], out=new[1:])
            rank_sorted = np.cumsum(new) - 1
            ranks = np.empty(self.n, dtype=np.intp)
            ranks[order] = rank_sorted
            self.ranks.append(ranks)
            self.distinct.append(values[new])
            size = int(rank_sorted[-1]) + 1
            bounds = np.unique(np.linspace(0, size, min(size, _GRID) + 1).round().astype(np.intp))
            self.bounds.append(bounds)
            self.bins.append(np.searchsorted(bounds, ranks, side="right") - 1)
        self._lock = threading.RLock()
        self._reference: tuple[ThresholdResult, ...] | None = None
        self._frontier: _Frontier | None = None

    # -- conversions ---------------------------------------------------------------------------
    def thresholds_from_cuts(self, cuts: Sequence[int] | np.ndarray) -> tuple[float, ...]:
        out = [math.inf if c == 0 else float(self.distinct[k][c - 1]) for k, c in enumerate(cuts)]
        out.append(-math.inf)
        return tuple(out)

    def cuts_from_thresholds(self, thresholds: Sequence[float]) -> np.ndarray:
        cuts = np.zeros(self.num_exits - 1, dtype=np.intp)
        for k in range(self.num_exits - 1):
            t = np.float32(thresholds[k])
            # distinct is descending: count values >= t
            cuts[k] = int(np.searchsorted(-self.distinct[k], -t, side="right"))
        return cuts

    def exits_of_cuts(self, cuts: Sequence[int] | np.ndarray) -> np.ndarray:
        exits = np.full(self.n, self.num_exits - 1, dtype=np.intp)
        for k in range(self.num_exits - 2, -1, -1):
            exits = np.where(self.ranks[k] < cuts[k], k, exits)
        return exits

    def score(self, cuts: Sequence[int] | np.ndarray) -> tuple[float, float]:
        """(correct count, total MACs) on the held-out set."""
        exits = self.exits_of_cuts(cuts)
        return float(self.correct[exits, np.arange(self.n)].sum()), float(self.macs[exits].sum())

    def result(self, cuts: Sequence[int] | np.ndarray, policy: str) -> ThresholdResult:
        return _result_from_exits(self.cal, self.thresholds_from_cuts(cuts), self.exits_of_cuts(cuts), policy)

    # -- reference sweep -----------------------------------------------------------------------
    def reference_points(self) -> tuple[ThresholdResult, ...]:
        with self._lock:
            if self._reference is None:
                self._reference = tuple(
                    evaluate_thresholds(self.cal, reference_thresholds(self.cal, probs), "reference")
                    for probs in reference_family_probs(self.num_exits)
                )
            return self._reference

    # -- optimiser -------------------------------------------------------------------------------
    def frontier(self) -> _Frontier:
        with self._lock:
            if self._frontier is None:
                self._frontier = _build_frontier(self)
            return self._frontier


@dataclass
class _Frontier:
    """Pareto points (ascending MACs, strictly ascending accuracy) found by the optimiser."""

    cuts: list[np.ndarray]
    correct: np.ndarray  # correct counts
    total_macs: np.ndarray  # summed over the held-out set
    results: dict[int, ThresholdResult] = field(default_factory=dict)


_Point = tuple[float, float, np.ndarray]  # (correct count, total MACs, cuts)


def _pareto(points: list[tuple[float, float, np.ndarray]]) -> list[tuple[float, float, np.ndarray]]:
    """Keep points not dominated: sort by (MACs asc, correct desc), keep strictly rising accuracy."""
    points = sorted(points, key=lambda p: (p[1], -p[0]))
    out: list[tuple[float, float, np.ndarray]] = []
    for point in points:
        if not out or point[0] > out[-1][0]:
            out.append(point)
    return out


def _reach_masks(prep: _Prepared, cuts: np.ndarray) -> list[np.ndarray]:
    """reach[k] (float 0/1): the sample did not exit before k under ``cuts``."""
    reach = [np.ones(prep.n, dtype=np.float64)]
    for k in range(prep.num_exits - 2):
        reach.append(reach[-1] * (prep.ranks[k] >= cuts[k]))
    return reach


def _lagrangian_sweep(prep: _Prepared, cuts: np.ndarray, lam: float) -> bool:
    """One backward coordinate-descent sweep maximising sum(correct) - lam * sum(MACs / full).

    Going from the second-to-last exit down to the first, the thresholds after k are already
    fixed, so the value of *continuing* from k is known per sample (``val``); the best cut of
    exit k is an argmax over prefix sums of per-sample gains, restricted to the samples that
    reach k (which depends only on the thresholds before k, unchanged so far in this sweep).
    Returns whether any cut changed; a cut only moves on a strict improvement (no cycling).
    """
    cost = prep.macs / prep.macs[-1]
    reach = _reach_masks(prep, cuts)
    val = prep.correct[-1] - lam * cost[-1]
    gain = np.empty(prep.n)
    changed = False
    for k in range(prep.num_exits - 2, -1, -1):
        own_cost = lam * cost[k]
        np.subtract(prep.correct[k], val, out=gain)
        gain -= own_cost
        gain *= reach[k]
        bounds = prep.bounds[k]
        prefix = np.bincount(prep.bins[k], gain, len(bounds) - 1).cumsum()
        best = int(np.argmax(prefix))
        cur = int(np.searchsorted(bounds, cuts[k]))  # cuts set here are always grid points
        if bounds[cur] == cuts[k]:
            current = float(prefix[cur - 1]) if cur else 0.0
        else:
            current = float(gain[prep.ranks[k] < cuts[k]].sum())
        if max(prefix[best], 0.0) > current + 1e-9:
            cuts[k] = bounds[best + 1] if prefix[best] > 0.0 else 0
            changed = True
        if cuts[k]:
            val = np.where(prep.ranks[k] < cuts[k], prep.correct[k] - own_cost, val)
    return changed


def _constrained_sweep(
    prep: _Prepared, cuts: np.ndarray, state: list[float], *, budget: float | None, target: float | None
) -> bool:
    """One backward sweep of budget- or accuracy-constrained coordinate descent.

    With ``budget`` (total MACs): maximise the correct count subject to total MACs <= budget
    (ties: cheaper). With ``target`` (correct count): minimise total MACs subject to correct >=
    target (ties: more accurate). ``state`` = [correct, total MACs] of ``cuts``, updated in place.
    Every grid cut of exit k is priced exactly (prefix sums of accuracy and MAC deltas over the
    samples that reach k); the best feasible one replaces the current cut only when it is strictly
    better, so the sweep never leaves the feasible set and never gets worse.
    """
    reach = _reach_masks(prep, cuts)
    val_acc = prep.correct[-1]
    val_cost = np.full(prep.n, prep.macs[-1])
    changed = False
    slack = _REL_TOL * prep.macs[-1] * prep.n
    for k in range(prep.num_exits - 2, -1, -1):
        bounds = prep.bounds[k]
        size = len(bounds) - 1
        d_acc = (prep.correct[k] - val_acc) * reach[k]
        d_cost = (prep.macs[k] - val_cost) * reach[k]
        acc_j = np.empty(size + 1)
        cost_j = np.empty(size + 1)
        acc_j[0] = cost_j[0] = 0.0
        np.cumsum(np.bincount(prep.bins[k], d_acc, size), out=acc_j[1:])
        np.cumsum(np.bincount(prep.bins[k], d_cost, size), out=cost_j[1:])
        cur = int(np.searchsorted(bounds, cuts[k]))
        if bounds[cur] == cuts[k]:  # on the grid: its deltas are a prefix sum already
            cur_acc, cur_cost = acc_j[cur], cost_j[cur]
        else:
            passing = prep.ranks[k] < cuts[k]
            cur_acc, cur_cost = float(d_acc[passing].sum()), float(d_cost[passing].sum())
        acc_j += state[0] - cur_acc
        cost_j += state[1] - cur_cost
        if budget is not None:
            masked = np.where(cost_j <= budget + slack, acc_j, -1.0)
            top = masked.max()
            candidates = np.flatnonzero(masked >= top - 0.5)
            best = int(candidates[np.argmin(cost_j[candidates])])
            better = acc_j[best] > state[0] + 0.5 or (acc_j[best] > state[0] - 0.5 and cost_j[best] < state[1] - slack)
        else:
            assert target is not None
            masked = np.where(acc_j >= target - 0.5, cost_j, np.inf)
            low = masked.min()
            candidates = np.flatnonzero(masked <= low + slack)
            best = int(candidates[np.argmax(acc_j[candidates])])
            better = bool(np.isfinite(low)) and (
                cost_j[best] < state[1] - slack or (cost_j[best] <= state[1] + slack and acc_j[best] > state[0] + 0.5)
            )
        if better:
            cuts[k] = bounds[best]
            state[0], state[1] = float(acc_j[best]), float(cost_j[best])
            changed = True
        if cuts[k]:
            passing = prep.ranks[k] < cuts[k]
            val_acc = np.where(passing, prep.correct[k], val_acc)
            val_cost = np.where(passing, prep.macs[k], val_cost)
    return changed


def _single_moves(prep: _Prepared, cuts: np.ndarray, acc0: float, cost0: float, keep: int) -> list[_Point]:
    """Every one-exit change of ``cuts`` that is more accurate, Pareto-filtered (at most ``keep`` per exit).

    Same pricing as the constrained sweep, but nothing is accepted: each exit's whole curve of
    (accuracy, MACs) over its grid cuts becomes candidates. Used to fill the gaps between frontier
    points with points that spend a budget more completely.
    """
    reach = _reach_masks(prep, cuts)
    val_acc = prep.correct[-1]
    val_cost = np.full(prep.n, prep.macs[-1])
    out: list[_Point] = []
    for k in range(prep.num_exits - 2, -1, -1):
        bounds = prep.bounds[k]
        size = len(bounds) - 1
        d_acc = (prep.correct[k] - val_acc) * reach[k]
        d_cost = (prep.macs[k] - val_cost) * reach[k]
        acc_j = np.concatenate([[0.0], np.bincount(prep.bins[k], d_acc, size).cumsum()])
        cost_j = np.concatenate([[0.0], np.bincount(prep.bins[k], d_cost, size).cumsum()])
        cur = int(np.searchsorted(bounds, cuts[k]))
        passing = prep.ranks[k] < cuts[k]
        if bounds[cur] == cuts[k]:
            cur_acc, cur_cost = acc_j[cur], cost_j[cur]
        else:
            cur_acc, cur_cost = float(d_acc[passing].sum()), float(d_cost[passing].sum())
        acc_j += acc0 - cur_acc
        cost_j += cost0 - cur_cost
        better = np.flatnonzero(acc_j > acc0 + 0.5)
        if better.size:
            order = better[np.lexsort((-acc_j[better], cost_j[better]))]
            running = np.maximum.accumulate(acc_j[order])
            strict = np.concatenate([[True], acc_j[order][1:] > running[:-1]])
            chosen = order[strict]
            if chosen.size > keep:
                chosen = chosen[np.linspace(0, chosen.size - 1, keep).round().astype(np.intp)]
            for j in chosen:
                moved = cuts.copy()
                moved[k] = bounds[j]
                out.append((float(acc_j[j]), float(cost_j[j]), moved))
        if cuts[k]:
            val_acc = np.where(passing, prep.correct[k], val_acc)
            val_cost = np.where(passing, prep.macs[k], val_cost)
    return out


#: Lagrange multipliers (accuracy per unit of full-network cost) swept by the optimiser.
_LAMBDAS: tuple[float, ...] = (0.0, *np.geomspace(2e-3, 4.0, 12).tolist())
_POLISH_BUDGETS = 6  # budgets between the first and the last exit's cost (denser at the low end)
_MAX_SWEEPS = 2
_GRID = 512  # candidate cuts per exit priced by the optimiser
_FILL_PER_EXIT = 8  # gap-filling one-exit moves kept per frontier point and exit


def _build_frontier(prep: _Prepared) -> _Frontier:
    """Candidate threshold vectors -> Pareto frontier of (held-out accuracy, held-out MACs).

    1. Seeds: every reference-sweep point, every anytime point (all exit at k) and the full
       network; they make the optimiser provably >= the reference family at every budget.
    2. Lagrangian sweep: for a ladder of multipliers, coordinate descent on
       correct - lam * MACs, warm-started from the previous multiplier (convex-hull points).
    3. Constrained polish: for a ladder of budgets, start from the best frontier point that fits
       and run budget-constrained coordinate descent (fills the non-convex gaps between hull points).
    4. Gap fill: from every frontier point, every one-exit change that is more accurate (a few per
       exit, Pareto-filtered) -- points that spend budgets between frontier points more completely.
    Answers are read off the frontier, so more budget never means less held-out accuracy.
    """
    num_exits = prep.num_exits
    points: list[tuple[float, float, np.ndarray]] = []

    def add(cuts: np.ndarray, known: tuple[float, float] | None = None) -> None:
        acc, cost = prep.score(cuts) if known is None else known
        points.append((acc, cost, cuts.copy()))

    for ref in prep.reference_points():
        fractions = np.asarray(ref.exit_fractions)
        known = (round(_acc(ref) * prep.n), float(np.dot(np.rint(fractions * prep.n), prep.macs)))
        add(prep.cuts_from_thresholds(ref.thresholds), known)
    full = np.array([len(d) for d in prep.distinct], dtype=np.intp)
    for k in range(num_exits):
        cuts = np.zeros(num_exits - 1, dtype=np.intp)
        cuts[k:] = full[k:]
        add(cuts)

    cuts = np.zeros(num_exits - 1, dtype=np.intp)
    for lam in _LAMBDAS:
        for _ in range(_MAX_SWEEPS):
            if not _lagrangian_sweep(prep, cuts, lam):
                break
        add(cuts)

    lo, hi = prep.macs[0] * prep.n, prep.macs[-1] * prep.n
    # quadratic spacing: more budgets where the curve is steep (cheap end)
    ladder = lo + (hi - lo) * np.linspace(0.0, 1.0, _POLISH_BUDGETS + 2)[1:-1] ** 2
    for budget_total in ladder:  # the paper's Eq. 9 points at the ladder budgets
        p = eq9_exit_probability(prep.macs, budget_total / prep.n)
        add(prep.cuts_from_thresholds(reference_thresholds(prep.cal, geometric_exit_probs(p, num_exits))))
    frontier = _pareto(points)
    polished: list[tuple[float, float, np.ndarray]] = []
    for budget_total in ladder:
        start = max((p for p in frontier if p[1] <= budget_total), key=lambda p: p[0])
        cuts = start[2].copy()
        state = [start[0], start[1]]
        for _ in range(_MAX_SWEEPS):
            if not _constrained_sweep(prep, cuts, state, budget=float(budget_total), target=None):
                break
        if state[0] > start[0]:
            polished.append((state[0], state[1], cuts.copy()))
    frontier = _pareto(frontier + polished)
    filled: list[_Point] = []
    for acc, cost, cuts in frontier:
        filled += _single_moves(prep, cuts, acc, cost, _FILL_PER_EXIT)
    frontier = _pareto(frontier + filled)
    return _Frontier(
        cuts=[p[2] for p in frontier],
        correct=np.array([p[0] for p in frontier]),
        total_macs=np.array([p[1] for p in frontier]),
    )


def _frontier_result(prep: _Prepared, index: int, policy: str) -> ThresholdResult:
    frontier = prep.frontier()
    with prep._lock:
        cached = frontier.results.get(index)
    if cached is None:
        cached = prep.result(frontier.cuts[index], "optimal")
        with prep._lock:
            frontier.results[index] = cached
    return cached if cached.policy == policy else _with_policy(cached, policy)


def _with_policy(result: ThresholdResult, policy: str) -> ThresholdResult:
    return ThresholdResult(
        result.thresholds, result.expected_accuracy, result.expected_macs, result.exit_fractions, policy
    )


def optimal_frontier(cal: CalibrationData) -> list[ThresholdResult]:
    """The optimiser's Pareto frontier (ascending MACs, strictly ascending held-out accuracy)."""
    prep = _prepared(cal)
    return [_frontier_result(prep, i, "optimal") for i in range(len(prep.frontier().cuts))]


# --------------------------------------------------------------------------------------------------
# prepared-state cache: a small LRU keyed by identity. Entries hold their calibration object, so
# an id cannot be reused while its entry lives; memory is bounded by _CACHE_SIZE entries.
# --------------------------------------------------------------------------------------------------
_CACHE: OrderedDict[int, _Prepared] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 8


def _prepared(cal: CalibrationData) -> _Prepared:
    key = id(cal)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit.cal is cal:
            _CACHE.move_to_end(key)
            return hit
    prep = _Prepared(cal)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit.cal is cal:
            return hit
        _CACHE[key] = prep
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return prep


# --------------------------------------------------------------------------------------------------
# public policies
# --------------------------------------------------------------------------------------------------
def _acc(r: ThresholdResult) -> float:
    return -1.0 if r.expected_accuracy is None else r.expected_accuracy


def _macs(r: ThresholdResult) -> float:
    return math.inf if r.expected_macs is None else r.expected_macs


def _check_budget_macs(cal: CalibrationData, macs: float) -> float:
    """Validate a MAC budget; returns it, clamped to the full network's cost."""
    try:
        value = float(macs)
    except (TypeError, ValueError) as exc:
        raise InvalidBudgetError(f"budget_macs must be a number, got {macs!r}") from exc
    if math.isnan(value) or math.isinf(value):
        raise InvalidBudgetError(f"budget_macs must be finite, got {value}")
    if value <= 0:
        raise InvalidBudgetError(f"budget_macs must be positive, got {value:g}")
    first, full = float(cal.cumulative_macs[0]), float(cal.cumulative_macs[-1])
    if value < first * (1.0 - _REL_TOL):
        raise InvalidBudgetError(
            f"budget_macs {value:,.0f} is below the cost of the first exit ({first:,.0f} MACs per image); "
            f"the cheapest possible budget is {first:,.0f}"
        )
    return min(max(value, first), full)


def _check_policy(policy: str) -> None:
    if policy not in ("optimal", "reference"):
        raise InvalidBudgetError(f"policy must be 'optimal' or 'reference', got {policy!r}")


def _reference_budget(cal: CalibrationData, macs: float) -> ThresholdResult:
    prep = _prepared(cal)
    num_exits = cal.num_exits

    def point(p: float) -> ThresholdResult:
        return evaluate_thresholds(cal, reference_thresholds(cal, geometric_exit_probs(p, num_exits)), "reference")

    p = eq9_exit_probability(cal.cumulative_macs, macs)
    eq9 = point(p)
    limit = macs * (1.0 + _REL_TOL)
    if _macs(eq9) > limit:
        # Eq. 9 assumes exact exit rates; floor() and ties move the held-out cost. Raise p until
        # it fits (p = 1 sends everything to exit 1, which always fits).
        lo, hi, best = p, 1.0, point(1.0)
        for _ in range(24):  # p to ~6e-8: far below one sample's worth of exits
            mid = 0.5 * (lo + hi)
            candidate = point(mid)
            if _macs(candidate) <= limit:
                hi, best = mid, candidate
            else:
                lo = mid
        eq9 = best
    candidates = [eq9, *(r for r in prep.reference_points() if _macs(r) <= limit)]
    return max(candidates, key=lambda r: (_acc(r), -_macs(r)))


def budget_macs(cal: CalibrationData, macs: float, policy: Policy | str = "optimal") -> ThresholdResult:
    """Thresholds for an average budget of ``macs`` MACs per image (held-out expected value).

    Validation: NaN, inf, <= 0 or below the first exit's cumulative cost -> InvalidBudgetError;
    above the full network's cost -> clamped to the full cost (the answer for "unlimited").

    ``policy="reference"`` (the paper): solve Eq. 9 for the exit probability p with incremental
    stage costs (:func:`eq9_exit_probability`), exit distribution p(1-p)^k, thresholds from
    :func:`reference_thresholds`. Eq. 9 is an assumption about exit rates, so the held-out cost of
    those thresholds can differ from the request (floor() of the counts, ties); when it is above
    the budget, p is raised by bisection until it fits. The answer is then the best (highest
    held-out accuracy, then cheapest) of that point and every point of :func:`reference_family`
    whose held-out expected MACs <= budget -- the flat-curve rule applied to a request.

    ``policy="optimal"`` (ours): the most accurate point of the optimiser's frontier with held-out
    expected MACs <= budget (ties: cheaper). The frontier contains every reference-family point,
    so the answer is never below the reference family's held-out accuracy, and it is monotone:
    a larger budget never gets a lower held-out accuracy. Held-out MACs never exceed the budget.
    """
    _check_policy(policy)
    value = _check_budget_macs(cal, macs)
    if policy == "reference":
        return _reference_budget(cal, value)
    prep = _prepared(cal)
    frontier = prep.frontier()
    limit = value * cal.num_samples * (1.0 + _REL_TOL)
    index = int(np.searchsorted(frontier.total_macs, limit, side="right")) - 1
    return _frontier_result(prep, max(index, 0), "optimal")


def max_accuracy_drop(
    cal: CalibrationData, drop: float, policy: Policy | str = "optimal", confidence: float | None = None
) -> ThresholdResult:
    """Seed 001's knob: the cheapest thresholds whose held-out accuracy >= final-exit accuracy - drop.

    ``drop`` is a fraction in [0, 1] (0.01 = one percentage point). "Cheapest" = lowest held-out
    expected MACs among the optimiser's frontier (``policy="optimal"``) or among the reference
    family plus the full network (``policy="reference"``); ties go to the more accurate point.
    The full network always qualifies, so there is always an answer.
    ``policy="optimal"`` also requires the one-sided upper confidence bound of the paired loss
    (``confidence``, default `DROP_CONFIDENCE` = 95 %; None or 0.5 = the plain rule) to be within
    ``drop`` (see `_drop_upper_bound`), so the promise holds on new data, not just on the held-out
    split; ``"reference"`` keeps the paper's plain rule.
    """
    _check_policy(policy)
    try:
        value = float(drop)
    except (TypeError, ValueError) as exc:
        raise InvalidBudgetError(f"max_accuracy_drop must be a number, got {drop!r}") from exc
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise InvalidBudgetError(
            f"max_accuracy_drop is a fraction in [0, 1] (0.01 = one percentage point), got {value}"
        )
    n = cal.num_samples
    final_correct = float(np.count_nonzero(cal.correct[-1]))
    target = math.ceil(final_correct - value * n - 1e-6)  # correct count needed
    if policy == "reference":
        prep = _prepared(cal)
        full = evaluate_thresholds(cal, [math.inf] * cal.num_exits, "reference")
        candidates = [r for r in (*prep.reference_points(), full) if _acc(r) * n >= target - 1e-6]
        return min(candidates, key=lambda r: (_macs(r), -_acc(r)))
    prep = _prepared(cal)
    frontier = prep.frontier()
    last = len(frontier.cuts) - 1
    index = min(int(np.searchsorted(frontier.correct, target - 0.5, side="left")), last)
    # The cheapest point that meets the drop on held-out meets it *only just* (the optimiser picks
    # it because it does), so on new data it misses about half the time: step up the frontier
    # until the one-sided upper confidence bound of the paired loss is within the drop as well.
    level = DROP_CONFIDENCE if confidence is None else float(confidence)
    if not 0.5 <= level < 1.0:
        raise InvalidBudgetError(f"confidence must be in [0.5, 1), got {level}")
    z = statistics.NormalDist().inv_cdf(level)
    while index < last and _drop_upper_bound(prep, frontier.cuts[index], z) > value + 1e-12:
        index += 1
    return _frontier_result(prep, index, "optimal")


#: One-sided confidence with which policy "optimal" keeps max_accuracy_drop on new data drawn like
#: the held-out split; measured effect in docs/policies.md.
DROP_CONFIDENCE = 0.95


def _drop_upper_bound(prep: _Prepared, cuts: np.ndarray, z: float) -> float:
    """Upper confidence bound of the paired accuracy loss vs the last exit, as a fraction.

    Per held-out sample d = correct(last exit) - correct(its exit) in {-1, 0, 1}; the loss is the
    mean of d, its standard error the sample standard deviation over sqrt(n) (paired: only the
    samples whose answer changes add variance, which is why this margin is small).
    """
    exits = prep.exits_of_cuts(cuts)
    d = prep.correct[-1] - prep.correct[exits, np.arange(prep.n)]  # (n,)
    if prep.n < 2:
        return float(d.mean()) if prep.n else 0.0
    return float(d.mean() + z * d.std(ddof=1) / math.sqrt(prep.n))


def max_exit(cal: CalibrationData | None, k: int, num_exits: int) -> ThresholdResult:
    """Anytime mode: every sample answers at exit ``k`` (1-based); stages after k never run.

    Thresholds: +inf before k (never exit), -inf from k on (always exit: exit k answers for every
    sample, so the engine stops there). Expected values come from ``cal`` when given.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise InvalidBudgetError(f"max_exit must be an integer exit number, got {k!r}")
    if not 1 <= int(k) <= num_exits:
        raise InvalidBudgetError(f"max_exit must be between 1 and {num_exits} (exits are 1-based), got {k}")
    thresholds = [math.inf] * (int(k) - 1) + [-math.inf] * (num_exits - int(k) + 1)
    if cal is None:
        return ThresholdResult(tuple(thresholds), None, None, None, "max_exit")
    _check_exit_count(cal, num_exits)
    return evaluate_thresholds(cal, thresholds, "max_exit")


def _check_exit_count(cal: CalibrationData, num_exits: int) -> None:
    if cal.num_exits != num_exits:
        raise InvalidBudgetError(f"calibration data has {cal.num_exits} exits, the model {num_exits}")


def explicit(
    cal: CalibrationData | None, thresholds: Sequence[float | None], num_exits: int | None = None
) -> ThresholdResult:
    """User-given thresholds, validated, normalised and evaluated.

    One value per exit. None, +inf or any value > 1 means "never exit here" (+inf; a max softmax
    never exceeds 1); other values must be finite and >= 0. The last exit always answers, so its
    value is ignored and stored as -inf. ``num_exits`` is required when ``cal`` is None.
    """
    expected = cal.num_exits if cal is not None else num_exits
    if expected is None:
        raise InvalidBudgetError("explicit thresholds need num_exits when there is no calibration data")
    if cal is not None and num_exits is not None:
        _check_exit_count(cal, num_exits)
    values = list(thresholds)
    if len(values) != expected:
        raise InvalidBudgetError(f"thresholds needs one value per exit ({expected}), got {len(values)}")
    normalised: list[float] = []
    for position, raw in enumerate(values[:-1], start=1):
        if raw is None:
            normalised.append(math.inf)
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError) as exc:
            raise InvalidBudgetError(f"threshold {position} must be a number or null, got {raw!r}") from exc
        if math.isnan(value) or value == -math.inf or value < 0:
            raise InvalidBudgetError(
                f"threshold {position} must be >= 0 (or null / > 1 for 'never exit here'), got {value}"
            )
        normalised.append(math.inf if value > 1.0 else value)
    normalised.append(-math.inf)
    if cal is None:
        return ThresholdResult(tuple(normalised), None, None, None, "explicit")
    return evaluate_thresholds(cal, normalised, "explicit")


# --------------------------------------------------------------------------------------------------
# synthetic calibration data (tests, docs and demos before a trained model exists)
# --------------------------------------------------------------------------------------------------
#: Cumulative MACs of the paper's anytime MSDNet (CIFAR-100), for synthetic data.
PAPER_ANYTIME_MACS: tuple[float, ...] = (
    15.14e6, 25.51e6, 37.79e6, 52.06e6, 62.18e6, 74.07e6, 87.73e6, 100.04e6, 110.12e6, 121.68e6,
)  # fmt: skip


def synthetic_calibration(
    num_exits: int = 10,
    num_samples: int = 5000,
    seed: int = 0,
    *,
    num_classes: int = 100,
    cumulative_macs: Sequence[float] | None = None,
) -> CalibrationData:
    """Plausible early-exit calibration data: per-sample difficulty shared across exits.

    Each sample has a latent difficulty; exit k has an ability rising with depth (accuracy about
    0.62 -> 0.77 like BoostNet on CIFAR-100); a per-sample noise that drifts across exits makes
    correctness imperfectly nested; the confidence is a noisy increasing function of the same
    margin, so it is informative but not perfectly calibrated (like a real max softmax).
    """
    rng = np.random.default_rng(seed)
    difficulty = rng.standard_normal(num_samples)
    ability = np.linspace(0.45, 1.05, num_exits)
    noise = rng.standard_normal(num_samples)
    confidence = np.empty((num_exits, num_samples), dtype=np.float32)
    correct = np.empty((num_exits, num_samples), dtype=bool)
    floor = 1.0 / num_classes
    for k in range(num_exits):
        noise = 0.95 * noise + 0.31 * rng.standard_normal(num_samples)
        margin = ability[k] - difficulty + 0.7 * noise
        correct[k] = margin > 0
        signal = 1.6 * margin + 0.9 * rng.standard_normal(num_samples) + 0.4 * k / max(num_exits - 1, 1)
        confidence[k] = (floor + (1.0 - floor) / (1.0 + np.exp(-signal))).astype(np.float32)
    if cumulative_macs is None:
        if num_exits <= len(PAPER_ANYTIME_MACS):
            macs = np.asarray(PAPER_ANYTIME_MACS[:num_exits])
        else:
            macs = np.linspace(15.14e6, 121.68e6, num_exits)
    else:
        macs = np.asarray(cumulative_macs, dtype=np.float64)
    return CalibrationData(confidence=confidence, correct=correct, cumulative_macs=macs)
