"""Budget (the request model) and BudgetResolver (budget -> thresholds, cached)."""

from __future__ import annotations

import math
import threading

import pytest
from pydantic import ValidationError

from service.core import policies as P
from service.core.artifact import CalibrationData
from service.core.budget import Budget, BudgetResolver, format_macs
from service.core.errors import InvalidBudgetError, ValidationFailedError
from tests.fixtures.synthetic_calibration import synthetic_calibration
from tests.service.test_thresholds_cli import build_manifest

CAL = synthetic_calibration(5, 800, 9, cumulative_macs=[10e6, 20e6, 30e6, 40e6, 50e6])
MANIFEST = build_manifest(CAL)


@pytest.fixture()
def resolver() -> BudgetResolver:
    return BudgetResolver(MANIFEST, CAL)


# ------------------------------------------------------------------------------------------------
# Budget
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields",
    [{"budget_macs": 3e7}, {"max_accuracy_drop": 0.01}, {"max_exit": 2}, {"thresholds": [0.9, None, 0.0]}],
)
def test_exactly_one_knob_accepted(fields: dict[str, object]) -> None:
    budget = Budget.parse(fields)
    assert budget.kind == next(iter(fields))
    assert budget.policy == "optimal"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({}, "exactly one"),
        ({"budget_macs": 3e7, "max_exit": 2}, "exactly one"),
        ({"budget_macs": -1}, "budget_macs"),
        ({"budget_macs": float("nan")}, "finite"),
        ({"budget_macs": float("inf")}, "finite"),
        ({"max_accuracy_drop": 1.5}, "max_accuracy_drop"),
        ({"max_exit": 0}, "max_exit"),
        ({"max_exit": True}, "boolean"),
        ({"max_exit": 2.5}, "max_exit"),
        ({"thresholds": []}, "thresholds"),
        ({"thresholds": [0.5, -0.1]}, "threshold 2"),
        ({"max_exit": 1, "policy": "greedy"}, "policy"),
        ({"max_exit": 1, "extra": 1}, "extra"),
    ],
)
def test_invalid_budgets(fields: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidBudgetError, match=match) as exc:
        Budget.parse(fields)
    assert isinstance(exc.value, ValidationFailedError)
    assert exc.value.error_type == "validation_error"
    with pytest.raises(ValidationError):
        Budget.model_validate(fields)


def test_budget_is_frozen_and_describes_itself() -> None:
    budget = Budget(budget_macs=3e7)
    with pytest.raises(ValidationError):
        budget.budget_macs = 1.0  # type: ignore[misc]
    assert budget.describe() == "budget_macs=30M (optimal)"
    assert Budget(max_accuracy_drop=0.01, policy="reference").describe() == "max_accuracy_drop=1% (reference)"
    assert Budget(max_exit=3).describe() == "max_exit=3"
    assert Budget(thresholds=[0.9, None, 2.0]).describe() == "thresholds=[0.9, never, never]"
    assert Budget.of(max_exit=1) == Budget(max_exit=1)
    assert format_macs(1.5e7) == "15M" and format_macs(2.5e9) == "2.5G" and format_macs(512) == "512"


def test_canonical_keys() -> None:
    # policy is irrelevant for max_exit / thresholds; None, +inf and > 1 all mean "never"; the last is ignored
    assert Budget(max_exit=2, policy="reference").key() == Budget(max_exit=2).key()
    assert Budget(thresholds=[None, 0.5, 0.3]).key() == Budget(thresholds=[2.0, 0.5, 0.9]).key()
    assert Budget(budget_macs=3e7).key() != Budget(budget_macs=3e7, policy="reference").key()
    assert hash(Budget(budget_macs=3e7).key()) == hash(Budget(budget_macs=30_000_000).key())


def test_openapi_schema_has_descriptions() -> None:
    schema = Budget.model_json_schema()
    for name in ("budget_macs", "max_accuracy_drop", "max_exit", "thresholds", "policy"):
        assert schema["properties"][name]["description"]


# ------------------------------------------------------------------------------------------------
# BudgetResolver
# ------------------------------------------------------------------------------------------------
def test_resolve_each_knob(resolver: BudgetResolver) -> None:
    assert resolver.resolve(Budget(budget_macs=25e6)) == P.budget_macs(CAL, 25e6)
    assert resolver.resolve({"budget_macs": 25e6, "policy": "reference"}) == P.budget_macs(CAL, 25e6, "reference")
    assert resolver.resolve(Budget(max_accuracy_drop=0.02)) == P.max_accuracy_drop(CAL, 0.02)
    assert resolver.resolve(Budget(max_exit=4)) == P.max_exit(CAL, 4, 5)
    explicit = resolver.resolve(Budget(thresholds=[0.9, None, 0.8, 0.7, 0.0]))
    assert explicit.thresholds == (0.9, math.inf, 0.8, 0.7, -math.inf)
    assert explicit.expected_accuracy is not None


def test_resolve_is_cached(resolver: BudgetResolver) -> None:
    first = resolver.resolve(Budget(budget_macs=33e6))
    second = resolver.resolve({"budget_macs": 33_000_000})
    assert second is first
    info = resolver.cache_info()
    assert info["hits"] == 1 and info["misses"] == 1 and info["size"] == 1


def test_cache_is_bounded() -> None:
    small = BudgetResolver(MANIFEST, CAL, cache_size=2)
    for k in (1, 2, 3):
        small.resolve(Budget(max_exit=k))
    assert small.cache_info()["size"] == 2


def test_errors_are_not_cached_and_raise_invalid_budget(resolver: BudgetResolver) -> None:
    for _ in range(2):
        with pytest.raises(InvalidBudgetError, match="below the cost of the first exit"):
            resolver.resolve(Budget(budget_macs=5e6))
        with pytest.raises(InvalidBudgetError, match="between 1 and 5"):
            resolver.resolve(Budget(max_exit=6))
        with pytest.raises(InvalidBudgetError, match="one value per exit"):
            resolver.resolve(Budget(thresholds=[0.5, 0.5]))
    assert resolver.cache_info()["size"] == 0


def test_without_calibration() -> None:
    bare = BudgetResolver(build_manifest(CAL, with_calibration=False), None)
    anytime = bare.resolve(Budget(max_exit=2))
    assert anytime.thresholds == (math.inf, -math.inf, -math.inf, -math.inf, -math.inf)
    assert anytime.expected_macs is None
    assert bare.resolve(Budget(thresholds=[0.5, None, None, None, None])).expected_accuracy is None
    with pytest.raises(InvalidBudgetError, match="budget_macs needs calibration data"):
        bare.resolve(Budget(budget_macs=3e7))
    with pytest.raises(InvalidBudgetError, match="max_accuracy_drop needs calibration data"):
        bare.resolve(Budget(max_accuracy_drop=0.01))
    with pytest.raises(InvalidBudgetError, match="calibration"):
        bare.curve()


def test_mismatched_calibration_rejected() -> None:
    other = synthetic_calibration(4, 100, 0)
    with pytest.raises(ValueError, match="exits"):
        BudgetResolver(MANIFEST, other)
    shifted = CalibrationData(CAL.confidence, CAL.correct, CAL.cumulative_macs * 2)
    with pytest.raises(ValueError, match="cumulative_macs"):
        BudgetResolver(MANIFEST, shifted)


def test_curves(resolver: BudgetResolver) -> None:
    optimal = resolver.curve("optimal")
    reference = resolver.curve("reference")
    assert len(reference) == 39
    accuracy = [r.expected_accuracy or 0.0 for r in reference]
    assert accuracy == sorted(accuracy)  # flat-curve rule: never goes down
    assert [r.expected_macs for r in optimal] == sorted(r.expected_macs or 0.0 for r in optimal)
    with pytest.raises(InvalidBudgetError):
        resolver.curve("greedy")


def test_concurrent_resolves_agree() -> None:
    shared = BudgetResolver(MANIFEST, CAL)
    budgets = [Budget(budget_macs=m) for m in (12e6, 18e6, 27e6, 35e6, 49e6)] + [Budget(max_accuracy_drop=0.01)]
    results: list[list[P.ThresholdResult]] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [shared.resolve(b) for b in budgets]
        with lock:
            results.append(mine)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6
    assert all(r == results[0] for r in results)
    shared.warmup()
