"""What a client may ask for (`Budget`) and how it becomes thresholds (`BudgetResolver`).

A budget is exactly one knob:

* ``budget_macs``        average MACs per image on the held-out set (``policy``: optimal | reference)
* ``max_accuracy_drop``  cheapest thresholds within this fraction of the final exit's accuracy
* ``max_exit``           anytime mode: every image answers at this exit (1-based)
* ``thresholds``         explicit per-exit thresholds (null = never exit here)

The resolver turns it into a `service.core.policies.ThresholdResult`. The search behind ``budget_macs``
and ``max_accuracy_drop`` runs once per calibration set (tens of milliseconds) and every
resolved budget is kept in a small thread-safe LRU, so the per-request cost of a repeated
budget is a dictionary lookup. Errors are `InvalidBudgetError` (HTTP 422 via service.http.errors).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.core import policies as policies
from service.core.artifact import CalibrationData, Manifest
from service.core.errors import InvalidBudgetError

__all__ = ["BUDGET_KINDS", "Budget", "BudgetKey", "BudgetResolver", "format_macs"]

BUDGET_KINDS: tuple[str, ...] = ("budget_macs", "max_accuracy_drop", "max_exit", "thresholds")

#: Hashable canonical form of a budget: (kind, normalised value, policy or None).
BudgetKey = tuple[str, Any, str | None]


def format_macs(value: float) -> str:
    """30000000 -> '30M', 1.5e7 -> '15M', 2.5e9 -> '2.5G' (short, for logs and describe())."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.4g}"


class Budget(BaseModel):
    """A compute budget: exactly one of the four knobs, plus the policy for the search-based ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    budget_macs: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="average multiply-accumulates per image (held-out expected value); at least the "
        "first exit's cost, values above the full network's cost are clamped to it",
        examples=[30_000_000],
    )
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="acceptable held-out accuracy loss versus the final exit, as a fraction "
        "(0.01 = one percentage point); the cheapest thresholds within it are used",
        examples=[0.01],
    )
    max_exit: int | None = Field(
        default=None,
        ge=1,
        description="anytime mode: every image answers at this exit (1-based); later stages never run",
        examples=[3],
    )
    thresholds: list[float | None] | None = Field(
        default=None,
        min_length=1,
        description="explicit max-softmax thresholds, one per exit: an image exits at the first exit whose "
        "confidence >= its threshold; null (or > 1) = never exit there; the last exit always answers",
        examples=[[0.9, 0.8, None, 0.0]],
    )
    policy: Literal["optimal", "reference"] = Field(
        default="optimal",
        description="search used by budget_macs / max_accuracy_drop: 'optimal' (direct threshold search, "
        "default) or 'reference' (the BoostNet paper's geometric exit distribution)",
    )

    @field_validator("max_exit", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("max_exit must be an exit number, not a boolean")
        return value

    @field_validator("thresholds")
    @classmethod
    def _threshold_values(cls, values: list[float | None] | None) -> list[float | None] | None:
        if values is None:
            return None
        for position, value in enumerate(values, start=1):
            if value is not None and (math.isnan(value) or value < 0):
                raise ValueError(f"threshold {position} must be >= 0 or null (never exit), got {value}")
        return values

    @model_validator(mode="after")
    def _exactly_one(self) -> Budget:
        given = [name for name in BUDGET_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of budget_macs, max_accuracy_drop, max_exit, thresholds"
                + (f" (got {', '.join(given)})" if given else " (got none)")
            )
        return self

    # -- constructors that speak the domain error ------------------------------------------------
    @classmethod
    def parse(cls, data: Budget | Mapping[str, Any]) -> Budget:
        """Validate a mapping (JSON body, settings) into a Budget; errors -> InvalidBudgetError."""
        if isinstance(data, Budget):
            return data
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise InvalidBudgetError(_validation_message(exc)) from exc

    @classmethod
    def of(cls, **fields: Any) -> Budget:
        """``Budget.of(budget_macs=3e7)``: keyword form of :meth:`parse`."""
        return cls.parse(fields)

    # -- views -------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The knob in use: one of BUDGET_KINDS."""
        return next(name for name in BUDGET_KINDS if getattr(self, name) is not None)

    @property
    def uses_policy(self) -> bool:
        """``policy`` only matters for the search-based knobs."""
        return self.kind in ("budget_macs", "max_accuracy_drop")

    def key(self) -> BudgetKey:
        """Canonical, hashable form: equal keys always resolve to the same thresholds."""
        kind = self.kind
        policy = self.policy if self.uses_policy else None
        if kind == "thresholds":
            assert self.thresholds is not None
            values = [math.inf if v is None or v > 1.0 else float(v) for v in self.thresholds]
            values[-1] = -math.inf
            return (kind, tuple(values), policy)
        if kind == "max_exit":
            return (kind, int(self.max_exit or 0), policy)
        return (kind, float(getattr(self, kind)), policy)

    def describe(self) -> str:
        """Short human form for logs, CLI output and metrics: 'budget_macs=30M (optimal)'."""
        kind = self.kind
        if kind == "budget_macs":
            assert self.budget_macs is not None
            return f"budget_macs={format_macs(self.budget_macs)} ({self.policy})"
        if kind == "max_accuracy_drop":
            assert self.max_accuracy_drop is not None
            return f"max_accuracy_drop={self.max_accuracy_drop * 100:.4g}% ({self.policy})"
        if kind == "max_exit":
            return f"max_exit={self.max_exit}"
        assert self.thresholds is not None
        shown = ["never" if v is None or v > 1.0 else f"{v:.4g}" for v in self.thresholds]
        return f"thresholds=[{', '.join(shown)}]"


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(p) for p in error.get("loc", ()))
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "invalid budget: " + "; ".join(parts)


class BudgetResolver:
    """Budget -> ThresholdResult for one model, with an LRU of resolved budgets.

    ``calibration`` (held-out split) may be None: then only ``max_exit`` and ``thresholds`` work
    (without expected accuracy / MACs), and the search-based knobs raise InvalidBudgetError.
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
    def full_macs(self) -> int:
        return self.manifest.full_macs

    def warmup(self) -> None:
        """Run the one-off searches now (startup), so no request pays for them."""
        if self.calibration is not None:
            policies.optimal_frontier(self.calibration)
            policies.reference_family(self.calibration)

    def resolve(self, budget: Budget | Mapping[str, Any]) -> policies.ThresholdResult:
        """Thresholds for ``budget`` (Budget or mapping of its fields); InvalidBudgetError if invalid."""
        parsed = Budget.parse(budget)
        key = parsed.key()
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
        kind = budget.kind
        if kind == "max_exit":
            assert budget.max_exit is not None
            return policies.max_exit(cal, budget.max_exit, self.num_exits)
        if kind == "thresholds":
            assert budget.thresholds is not None
            return policies.explicit(cal, budget.thresholds, self.num_exits)
        if cal is None:
            raise InvalidBudgetError(
                f"{kind} needs calibration data and this model has none; use max_exit or thresholds, "
                "or re-export the model with calibration data (`boostserve export --data ...`)"
            )
        if kind == "budget_macs":
            assert budget.budget_macs is not None
            return policies.budget_macs(cal, budget.budget_macs, budget.policy)
        assert budget.max_accuracy_drop is not None
        return policies.max_accuracy_drop(cal, budget.max_accuracy_drop, budget.policy)

    def curve(self, policy: policies.Policy | str = "optimal") -> list[policies.ThresholdResult]:
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
        raise InvalidBudgetError(f"policy must be 'optimal' or 'reference', got {policy!r}")

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {
                "size": len(self._cache),
                "max_size": self._cache_size,
                "hits": self.hits,
                "misses": self.misses,
            }
