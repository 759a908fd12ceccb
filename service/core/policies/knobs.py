"""The public knobs: a client's budget (MACs, accuracy drop, max exit, explicit) -> thresholds.

Each knob validates its value (InvalidBudgetError, HTTP 422 upstream) and picks its answer from
the reference algorithm (service.core.policies.reference) or the optimiser's frontier
(service.core.policies.optimiser); thresholds the client spells out are normalised to the exit
rule's vocabulary (service.core.exit_rule: NEVER_EXIT, ALWAYS_EXIT, the last exit answers).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import numpy as np

from service.core.artifact import CalibrationData
from service.core.errors import InvalidBudgetError
from service.core.exit_rule import ALWAYS_EXIT, NEVER_EXIT
from service.core.knobs import DROP_CONFIDENCE
from service.core.policies.optimiser import frontier_of, frontier_result
from service.core.policies.prepared import prepared
from service.core.policies.reference import (
    eq9_exit_probability,
    geometric_exit_probs,
    reference_family,
    reference_thresholds,
)
from service.core.policies.result import REL_TOL, ThresholdResult, accuracy_of, evaluate_thresholds, macs_of
from service.core.policies.risk import certified_drop

Policy = Literal["optimal", "reference"]


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
    if value < first * (1.0 - REL_TOL):
        raise InvalidBudgetError(
            f"budget_macs {value:,.0f} is below the cost of the first exit ({first:,.0f} MACs per image); "
            f"the cheapest possible budget is {first:,.0f}"
        )
    return min(max(value, first), full)


def _check_policy(policy: str) -> None:
    if policy not in ("optimal", "reference"):
        raise InvalidBudgetError(f"policy must be 'optimal' or 'reference', got {policy!r}")


#: Reference answers kept per calibration set (policy "optimal" weighs the same one as "reference").
_REFERENCE_MEMO = 64


def _reference_budget(cal: CalibrationData, macs: float) -> ThresholdResult:
    """Eq. 9 with the repair bisection, memoised per calibration set (a small LRU of budgets)."""
    memo: OrderedDict[float, ThresholdResult] = prepared(cal).memo("reference_budget", OrderedDict)
    with prepared(cal).lock:
        hit = memo.get(macs)
        if hit is not None:
            memo.move_to_end(macs)
            return hit
    result = _reference_budget_uncached(cal, macs)
    with prepared(cal).lock:
        memo[macs] = result
        while len(memo) > _REFERENCE_MEMO:
            memo.popitem(last=False)
    return result


def _reference_budget_uncached(cal: CalibrationData, macs: float) -> ThresholdResult:
    num_exits = cal.num_exits

    def point(p: float) -> ThresholdResult:
        return evaluate_thresholds(cal, reference_thresholds(cal, geometric_exit_probs(p, num_exits)), "reference")

    p = eq9_exit_probability(cal.cumulative_macs, macs)
    eq9 = point(p)
    limit = macs * (1.0 + REL_TOL)
    if macs_of(eq9) > limit:
        # Eq. 9 assumes exact exit rates; floor() and ties move the held-out cost. Raise p until
        # it fits (p = 1 sends everything to exit 1, which always fits).
        lo, hi, best = p, 1.0, point(1.0)
        for _ in range(24):  # p to ~6e-8: far below one sample's worth of exits
            mid = 0.5 * (lo + hi)
            candidate = point(mid)
            if macs_of(candidate) <= limit:
                hi, best = mid, candidate
            else:
                lo = mid
        eq9 = best
    candidates = [eq9, *(r for r in reference_family(cal) if macs_of(r) <= limit)]
    return max(candidates, key=lambda r: (accuracy_of(r), -macs_of(r)))


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

    ``policy="optimal"`` (ours): the most accurate of the optimiser's frontier point with held-out
    expected MACs <= budget and the reference answer for the same budget (ties: cheaper). The
    frontier is a finite set of points and Eq. 9 a continuous family, so between two frontier
    points the reference can spend the budget more completely; taking the better of the two makes
    "never below the reference at the exact budget" true by construction (the frontier alone fell
    below it at a few percent of budgets, measured in docs/policies.md). Held-out MACs never
    exceed the budget. The frontier part is monotone in the budget; the Eq. 9 part need not be.
    """
    _check_policy(policy)
    value = _check_budget_macs(cal, macs)
    reference = _reference_budget(cal, value)
    if policy == "reference":
        return reference
    prep = prepared(cal)
    frontier = frontier_of(prep)
    limit = value * cal.num_samples * (1.0 + REL_TOL)
    index = int(np.searchsorted(frontier.total_macs, limit, side="right")) - 1
    best = frontier_result(prep, max(index, 0), "optimal")
    if (accuracy_of(reference), -macs_of(reference)) > (accuracy_of(best), -macs_of(best)):
        return ThresholdResult(
            reference.thresholds,
            reference.expected_accuracy,
            reference.expected_macs,
            reference.exit_fractions,
            "optimal",
        )
    return best


def max_accuracy_drop(
    cal: CalibrationData, drop: float, policy: Policy | str = "optimal", confidence: float | None = None
) -> ThresholdResult:
    """Seed 001's knob with a guarantee: the loss on new images exceeds ``drop`` with probability <= 1 - confidence.

    ``drop`` is a fraction in [0, 1] (0.01 = one percentage point) of accuracy versus the full
    network; ``confidence`` is `drop_confidence` (None: `DROP_CONFIDENCE`), in (0, 1). The answer
    is the cheapest point of a threshold path fixed in code (``policy`` "optimal": thresholds that
    relax with depth; "reference": one shared threshold) that fixed-sequence testing with exact
    binomial tests certifies on the calibration images (`service.core.policies.risk`, proof in
    docs/policies.md). The full network is the answer when nothing cheaper can be certified (d = 0
    without evidence of a gain, or too few calibration images).
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
    return certified_drop(cal, value, policy, DROP_CONFIDENCE if confidence is None else confidence)


def max_exit(cal: CalibrationData | None, k: int, num_exits: int) -> ThresholdResult:
    """Anytime mode: every sample answers at exit ``k`` (1-based); stages after k never run.

    Thresholds: +inf before k (never exit), -inf from k on (always exit: exit k answers for every
    sample, so the engine stops there). Expected values come from ``cal`` when given.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise InvalidBudgetError(f"max_exit must be an integer exit number, got {k!r}")
    if not 1 <= int(k) <= num_exits:
        raise InvalidBudgetError(f"max_exit must be between 1 and {num_exits} (exits are 1-based), got {k}")
    thresholds = [NEVER_EXIT] * (int(k) - 1) + [ALWAYS_EXIT] * (num_exits - int(k) + 1)
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
            normalised.append(NEVER_EXIT)
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError) as exc:
            raise InvalidBudgetError(f"threshold {position} must be a number or null, got {raw!r}") from exc
        if math.isnan(value) or value == -math.inf or value < 0:
            raise InvalidBudgetError(
                f"threshold {position} must be >= 0 (or null / > 1 for 'never exit here'), got {value}"
            )
        normalised.append(NEVER_EXIT if value > 1.0 else value)
    normalised.append(ALWAYS_EXIT)
    if cal is None:
        return ThresholdResult(tuple(normalised), None, None, None, "explicit")
    return evaluate_thresholds(cal, normalised, "explicit")
