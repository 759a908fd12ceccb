"""How a budget becomes thresholds: `BudgetResolver`, a cached front to `service.core.policies`.

The vocabulary itself (the knob table, `Budget`, `parse_options`) is `service.core.knobs`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.core import policies
from service.core.artifact import CalibrationData, Manifest
from service.core.errors import InvalidBudgetError
from service.core.exit_rule import NEVER_EXIT, force_last_exit
from service.core.knobs import BUDGET_KNOBS, POLICIES, Budget

__all__ = ["BudgetKey", "BudgetResolver", "ResolvedBudget", "budget_key"]

#: Hashable canonical form of a budget: (kind, normalised value, policy or None, drop_confidence or None).
BudgetKey = tuple[str, Any, str | None, float | None]


def budget_key(budget: Budget) -> BudgetKey:
    """Canonical form: equal keys always resolve to the same thresholds (for the resolver's cache)."""
    if budget.kind == "thresholds":
        values = [NEVER_EXIT if v is None or v > 1.0 else float(v) for v in budget.value]
        return (budget.kind, tuple(force_last_exit(values)), None, None)
    confidence = budget.risk_confidence if budget.knob.takes_confidence else None
    return (budget.kind, budget.value, budget.policy, confidence)


@dataclass(frozen=True)
class ResolvedBudget:
    """A budget with its thresholds, and whether early exit is on for the request.

    ``budget`` is the budget as given (by the request, or the global budget as set). On the global
    budget the live layer (`service.core.live`) may serve other thresholds than ``budget`` resolves
    to: then ``effective`` is the budget whose thresholds are in force (the point the live
    controllers moved to), and ``degraded`` is true when that point is cheaper than the budget
    because of overload (SLO mode). Requests that carry their own budget always get
    ``effective=None, degraded=False``: the controllers never touch them.
    """

    budget: Budget
    thresholds: policies.ThresholdResult
    early_exit: bool
    effective: Budget | None = None
    degraded: bool = False


# --------------------------------------------------------------------------------------------------
class BudgetResolver:
    """Budget -> ThresholdResult for one model, with an LRU of resolved budgets.

    ``calibration`` (held-out split) may be None: then only the knobs that need no calibration work
    (without expected accuracy / MACs), and the others raise InvalidBudgetError.
    Thread-safe: the cache is guarded by a lock; a budget resolved concurrently by two threads is
    computed twice at worst (deterministically, so both get equal results).
    """

    def __init__(self, manifest: Manifest, calibration: CalibrationData | None, cache_size: int = 256) -> None:
        if calibration is not None:
            if calibration.num_exits != manifest.num_stages:
                raise ValueError(
                    f"calibration data has {calibration.num_exits} exits, the manifest {manifest.num_stages} stages"
                )
            macs = [float(m) for m in calibration.cumulative_macs]
            if macs != [float(m) for m in manifest.cumulative_macs]:
                raise ValueError("calibration cumulative_macs differ from the manifest's")
        self.manifest = manifest
        self.calibration = calibration
        self._cache_size = max(1, cache_size)
        self._cache: OrderedDict[BudgetKey, policies.ThresholdResult] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def num_exits(self) -> int:
        return self.manifest.num_stages

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def warmup(self) -> None:
        """Run the one-off searches now (startup), so no request pays for them."""
        if self.calibration is not None:
            policies.optimal_frontier(self.calibration)
            policies.reference_family(self.calibration)

    def resolve(self, budget: Budget | Mapping[str, Any]) -> policies.ThresholdResult:
        """Thresholds for ``budget`` (Budget or mapping of its knobs); InvalidBudgetError if invalid."""
        parsed = Budget.parse(budget)
        key = budget_key(parsed)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return cached
            self.misses += 1
        result = self._compute(parsed)
        with self._lock:
            self._cache[key] = result
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result

    def _compute(self, budget: Budget) -> policies.ThresholdResult:
        cal = self.calibration
        if cal is None and budget.needs_calibration:  # the knob table says which knobs need it
            usable = " or ".join(k.name for k in BUDGET_KNOBS if not k.needs_calibration)
            raise InvalidBudgetError(
                f"{budget.kind} needs calibration data and this model has none; use {usable}, "
                "or re-export the model with calibration data (`boostserve export --data ...`)"
            )
        if budget.kind == "max_exit":
            return policies.max_exit(cal, budget.value, self.num_exits)
        if budget.kind == "thresholds":
            return policies.explicit(cal, list(budget.value), self.num_exits)
        assert cal is not None  # every other knob needs calibration (checked above)
        policy = budget.policy or budget.knob.default_policy or POLICIES[0]
        if budget.kind == "budget_macs":
            return policies.budget_macs(cal, budget.value, policy)
        if budget.kind == "max_accuracy_drop":
            return policies.max_accuracy_drop(cal, budget.value, policy, budget.risk_confidence)
        raise InvalidBudgetError(f"{budget.kind} is not a budget knob")  # pragma: no cover - table and code agree

    def curve(self, policy: str = "optimal") -> list[policies.ThresholdResult]:
        """Held-out accuracy-vs-MACs points of a policy, ascending MACs (for reports and /v1/model).

        optimal: the optimiser's Pareto frontier; reference: the reference sweep with the paper's
        flat-curve rule applied.
        """
        if self.calibration is None:
            raise InvalidBudgetError("accuracy/MACs curves need calibration data and this model has none")
        if policy == "optimal":
            return policies.optimal_frontier(self.calibration)
        if policy == "reference":
            return policies.flat_curve(policies.reference_family(self.calibration))
        raise InvalidBudgetError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"size": len(self._cache), "max_size": self._cache_size, "hits": self.hits, "misses": self.misses}
