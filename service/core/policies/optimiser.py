"""Our optimiser: a direct search over threshold vectors for the held-out accuracy/MACs frontier.

Why not just the paper's algorithm (service.core.policies.reference): Eq. 9 fixes the *shape* of
the exit distribution, so at most budgets some thresholds it cannot express are both cheaper and
more accurate on held-out data. The search is seeded with every reference point, so its Pareto
frontier is never below the reference family; answers are read off that frontier (built once per
calibration set, then kept in its prepared state), so a larger budget never gets less held-out
accuracy. docs/policies.md has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.core.artifact import CalibrationData
from service.core.policies.prepared import Prepared, prepared
from service.core.policies.reference import (
    eq9_exit_probability,
    geometric_exit_probs,
    reference_family,
    reference_thresholds,
)
from service.core.policies.result import REL_TOL, ThresholdResult, accuracy_of


@dataclass
class Frontier:
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


def _reach_masks(prep: Prepared, cuts: np.ndarray) -> list[np.ndarray]:
    """reach[k] (float 0/1): the sample did not exit before k under ``cuts``."""
    reach = [np.ones(prep.n, dtype=np.float64)]
    for k in range(prep.num_exits - 2):
        reach.append(reach[-1] * (prep.ranks[k] >= cuts[k]))
    return reach


def _lagrangian_sweep(prep: Prepared, cuts: np.ndarray, lam: float) -> bool:
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
    prep: Prepared, cuts: np.ndarray, state: list[float], *, budget: float | None, target: float | None
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
    slack = REL_TOL * prep.macs[-1] * prep.n
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


def _single_moves(prep: Prepared, cuts: np.ndarray, acc0: float, cost0: float, keep: int) -> list[_Point]:
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
_FILL_PER_EXIT = 8  # gap-filling one-exit moves kept per frontier point and exit


def _build_frontier(prep: Prepared) -> Frontier:
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

    for ref in reference_family(prep.cal):
        fractions = np.asarray(ref.exit_fractions)
        known = (round(accuracy_of(ref) * prep.n), float(np.dot(np.rint(fractions * prep.n), prep.macs)))
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
    return Frontier(
        cuts=[p[2] for p in frontier],
        correct=np.array([p[0] for p in frontier]),
        total_macs=np.array([p[1] for p in frontier]),
    )


def frontier_of(prep: Prepared) -> Frontier:
    """The optimiser's frontier of ``prep`` (built on first use, then kept in its memo)."""
    return prep.memo("frontier", lambda: _build_frontier(prep))


def frontier_result(prep: Prepared, index: int, policy: str) -> ThresholdResult:
    """Frontier point ``index`` as a ThresholdResult labelled ``policy`` (scored once, then kept)."""
    points = frontier_of(prep)
    with prep.lock:
        cached = points.results.get(index)
    if cached is None:
        cached = prep.result(points.cuts[index], "optimal")
        with prep.lock:
            points.results[index] = cached
    return cached if cached.policy == policy else _with_policy(cached, policy)


def _with_policy(result: ThresholdResult, policy: str) -> ThresholdResult:
    return ThresholdResult(
        result.thresholds, result.expected_accuracy, result.expected_macs, result.exit_fractions, policy
    )


def optimal_frontier(cal: CalibrationData) -> list[ThresholdResult]:
    """The optimiser's Pareto frontier (ascending MACs, strictly ascending held-out accuracy)."""
    prep = prepared(cal)
    return [frontier_result(prep, i, "optimal") for i in range(len(frontier_of(prep).cuts))]
