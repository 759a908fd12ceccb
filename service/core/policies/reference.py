"""The BoostNet paper's threshold algorithm: Eq. 9, the reference code's held-out loop and sweep.

Kept verbatim from the reference code (and apart from our optimiser) because it is the baseline
the optimiser must never fall below, and the `policy="reference"` answer clients can ask for:

* :func:`eq9_exit_probability` solves Eq. 9 for the exit probability p of a MAC budget,
  :func:`geometric_exit_probs` turns p into the exit distribution p(1-p)^k;
* :func:`reference_thresholds` is the reference code's held-out loop (exit distribution ->
  thresholds);
* :func:`reference_family` is the reference code's geometric sweep (39 points) and
  :func:`flat_curve` its flat-curve rule for curves and reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from service.core.artifact import CalibrationData
from service.core.errors import InvalidBudgetError
from service.core.exit_rule import NEVER_EXIT, exits, force_last_exit
from service.core.policies.prepared import prepared
from service.core.policies.result import ThresholdResult, accuracy_of, evaluate_thresholds, macs_of

#: The reference code's sweep: p = 1..39, q = p / 20, probs[k] = q^(k+1) normalised over the exits.
REFERENCE_SWEEP: tuple[int, ...] = tuple(range(1, 40))


def reference_thresholds(cal: CalibrationData, probs: Sequence[float]) -> tuple[float, ...]:
    """The reference code's held-out loop, verbatim.

    ``m = floor(n * probs[k])`` is counted over all n samples (not the remaining ones); T[k] is the
    m-th highest confidence among the samples still remaining (+inf when m == 0 or m exceeds them);
    samples at or above T[k] exit (ties too, by service.core.exit_rule); T[N-1] = ALWAYS_EXIT.
    """
    num_exits, n = cal.num_exits, cal.num_samples
    if len(probs) != num_exits:
        raise InvalidBudgetError(f"need {num_exits} exit probabilities, got {len(probs)}")
    prep = prepared(cal)
    remaining = np.ones(n, dtype=bool)  # (n,)
    thresholds = [NEVER_EXIT] * num_exits
    for k in range(num_exits - 1):
        m = math.floor(n * float(probs[k]))
        if m >= 1:
            # c = sort(conf[k][remaining], descending); c[m-1] via the presorted order of exit k
            counts = np.cumsum(remaining[prep.order[k]])
            if m <= counts[-1]:
                thresholds[k] = float(prep.sorted_conf[k][int(np.searchsorted(counts, m))])
        remaining &= ~exits(cal.confidence[k], thresholds[k])
    return tuple(force_last_exit(thresholds))


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
    prep = prepared(cal)

    def sweep() -> tuple[ThresholdResult, ...]:
        return tuple(
            evaluate_thresholds(cal, reference_thresholds(cal, probs), "reference")
            for probs in reference_family_probs(prep.num_exits)
        )

    return list(prep.memo("reference_family", sweep))


def flat_curve(points: Sequence[ThresholdResult]) -> list[ThresholdResult]:
    """The paper's flat-curve rule, for curves and reports.

    Sorted by held-out expected MACs; a point that does not improve held-out accuracy over a
    cheaper one is replaced by the earlier (cheaper) thresholds, so the curve never goes down.
    """
    ordered = sorted(points, key=lambda r: (macs_of(r), -accuracy_of(r)))
    out: list[ThresholdResult] = []
    for point in ordered:
        if out and accuracy_of(point) <= accuracy_of(out[-1]):
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
