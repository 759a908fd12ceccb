"""Budget (the request model) and BudgetResolver (budget -> thresholds, cached)."""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest

from service.core import policies as P
from service.core.artifact import CalibrationData
from service.core.budget import BudgetResolver, budget_key
from service.core.errors import InvalidBudgetError, ValidationFailedError
from service.core.knobs import KNOBS, Budget, format_macs, parse_options
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
    ("fields", "policy"),
    [
        ({"budget_macs": 3e7}, "reference"),  # each knob's out-of-sample winner (docs/policies.md)
        ({"budget_macs": "3e7", "policy": "reference"}, "reference"),  # text form, as a query string gives it
        ({"max_accuracy_drop": 0.01}, "optimal"),
        ({"max_exit": 2}, None),
        ({"max_exit": "2"}, None),
        ({"thresholds": [0.9, None, 0.0]}, None),
        ({"thresholds": "0.9,never,0"}, None),
    ],
)
def test_exactly_one_knob_accepted(fields: dict[str, object], policy: str | None) -> None:
    budget = Budget.parse(fields)
    assert budget.kind == next(iter(fields))
    assert budget.policy == policy  # only the knobs that take a policy carry one


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "give exactly one of budget_macs, max_accuracy_drop, max_exit, thresholds"),
        (
            {"budget_macs": 3e7, "max_exit": 2},
            "give at most one budget knob (budget_macs, max_accuracy_drop, max_exit, thresholds), "
            "got budget_macs, max_exit",
        ),
        ({"budget_macs": -1}, "budget_macs must be > 0, got -1"),
        ({"budget_macs": float("nan")}, "budget_macs must be a finite number, got nan"),
        ({"budget_macs": float("inf")}, "budget_macs must be a finite number, got inf"),
        ({"budget_macs": "1e400"}, "budget_macs must be a finite number, got '1e400'"),
        ({"budget_macs": True}, "budget_macs must be a number, got True"),
        ({"max_accuracy_drop": 1.5}, "max_accuracy_drop must be in [0, 1], got 1.5"),
        ({"max_exit": 0}, "max_exit must be >= 1, got 0"),
        ({"max_exit": True}, "max_exit must be a whole number, got True"),
        ({"max_exit": 2.5}, "max_exit must be a whole number, got 2.5"),
        ({"max_exit": "1.0"}, "max_exit must be a whole number, got '1.0'"),
        ({"thresholds": []}, "thresholds must be a list of numbers or nulls, or text such as '0.9,0.8,never,0'"),
        ({"thresholds": [0.5, -0.1]}, "thresholds[2] must be >= 0 or never, got -0.1"),
        ({"thresholds": "0.5,x"}, "thresholds[2] must be a number, got 'x'"),
        ({"max_exit": 1, "policy": "greedy"}, "policy must be one of optimal, reference, got 'greedy'"),
        (
            {"max_exit": 1, "policy": "reference"},
            "policy applies to budget_macs, max_accuracy_drop only, not to max_exit",
        ),
        ({"policy": "reference"}, "policy needs a budget knob that takes one: budget_macs, max_accuracy_drop"),
        (
            {"max_exit": 1, "extra": 1},
            "unknown budget field 'extra'; accepted: budget_macs, max_accuracy_drop, max_exit, thresholds, policy, "
            "drop_confidence",
        ),
        ({"max_accuracy_drop": 0.01, "drop_confidence": 1}, "drop_confidence must be in (0, 1), got 1"),
        ({"max_accuracy_drop": 0.01, "drop_confidence": "0"}, "drop_confidence must be in (0, 1), got '0'"),
        (
            {"budget_macs": 3e7, "drop_confidence": 0.9},
            "drop_confidence applies to max_accuracy_drop only, not to budget_macs",
        ),
        ({"drop_confidence": 0.9}, "drop_confidence needs a budget knob that takes it: max_accuracy_drop"),
    ],
)
def test_invalid_budgets(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidBudgetError) as exc:
        Budget.parse(fields)
    assert exc.value.message == message
    assert isinstance(exc.value, ValidationFailedError)
    assert exc.value.error_type == "validation_error"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"early_exit": "yes"}, "early_exit must be a boolean: true or false (in text also 1 or 0), got 'yes'"),
        ({"early_exit": 1}, "early_exit must be a boolean: true or false (in text also 1 or 0), got 1"),
        (
            {"early_exit": False, "max_exit": 2},
            "early_exit=false runs every stage, so max_exit would be ignored: give one or the other",
        ),
        ({"deadline_ms": 0}, "deadline_ms must be in (0, 600000], got 0"),
        ({"deadline_ms": 600_001}, "deadline_ms must be in (0, 600000], got 600001"),
    ],
)
def test_invalid_request_options(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationFailedError) as exc:
        parse_options(fields)
    assert exc.value.message == message


def test_booleans_are_spelled_alike_in_text_and_json() -> None:
    for raw, value in (
        ("true", True),
        ("TRUE", True),
        ("1", True),
        (True, True),
        ("false", False),
        ("0", False),
        (False, False),
    ):
        assert parse_options({"early_exit": raw}).early_exit is value


def test_budget_is_frozen_and_describes_itself() -> None:
    budget = Budget.of(budget_macs=3e7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        budget.value = 1.0  # type: ignore[misc]
    assert budget.describe() == "budget_macs=30M (reference)"
    assert Budget.of(max_accuracy_drop=0.01, policy="reference").describe() == "max_accuracy_drop=1% (reference)"
    assert Budget.of(max_exit=3).describe() == "max_exit=3"
    assert Budget.of(thresholds=[0.9, None, 2.0]).describe() == "thresholds=[0.9, never, never]"
    assert Budget.of(thresholds="0.9,never,0").to_json() == {"thresholds": [0.9, None, 0.0]}
    assert Budget.of(budget_macs="2e6").to_json() == {"budget_macs": 2e6, "policy": "reference"}
    assert Budget.parse({"budget_macs": 2e6}, default_policy="optimal").policy == "optimal"  # the settings' override
    assert format_macs(1.5e7) == "15M" and format_macs(2.5e9) == "2.5G" and format_macs(512) == "512"


def test_drop_confidence_travels_with_the_budget(resolver: BudgetResolver) -> None:
    """As given in answers (absent = the default 0.95), part of the cache key, passed to the policy."""
    given = Budget.parse({"max_accuracy_drop": "0.02", "drop_confidence": "0.8"})
    assert given.confidence == 0.8 and given.risk_confidence == 0.8
    assert given.to_json() == {"max_accuracy_drop": 0.02, "policy": "optimal", "drop_confidence": 0.8}
    assert given.describe() == "max_accuracy_drop=2% (optimal, drop_confidence=0.8)"
    default = Budget.of(max_accuracy_drop=0.02)
    assert default.confidence is None and default.risk_confidence == P.DROP_CONFIDENCE == 0.95
    assert default.to_json() == {"max_accuracy_drop": 0.02, "policy": "optimal"}
    assert budget_key(default) == budget_key(Budget.of(max_accuracy_drop=0.02, drop_confidence=0.95))
    assert budget_key(default) != budget_key(given)
    assert resolver.resolve(given) == P.max_accuracy_drop(CAL, 0.02, "optimal", 0.8)
    assert resolver.resolve(default) == P.max_accuracy_drop(CAL, 0.02, "optimal", 0.95)
    assert resolver.resolve(given) != resolver.resolve(default)  # a lower confidence is cheaper here
    assert parse_options({"max_accuracy_drop": 0.01, "drop_confidence": 0.9}).budget == Budget(
        "max_accuracy_drop", 0.01, "optimal", 0.9
    )


def test_canonical_keys() -> None:
    # None, +inf and > 1 all mean "never"; the last value is ignored (the last exit always answers)
    assert budget_key(Budget.of(thresholds=[None, 0.5, 0.3])) == budget_key(Budget.of(thresholds=[2.0, 0.5, 0.9]))
    assert budget_key(Budget.of(budget_macs=3e7)) != budget_key(Budget.of(budget_macs=3e7, policy="optimal"))
    assert hash(budget_key(Budget.of(budget_macs=3e7))) == hash(budget_key(Budget.of(budget_macs=30_000_000)))


def test_every_knob_has_a_description_and_a_valid_example() -> None:
    for knob in KNOBS:
        assert knob.description and knob.json_schema()["description"] == knob.description
        assert knob.parse(knob.example) is not None


# ------------------------------------------------------------------------------------------------
# BudgetResolver
# ------------------------------------------------------------------------------------------------
def test_resolve_each_knob(resolver: BudgetResolver) -> None:
    assert resolver.resolve(Budget.of(budget_macs=25e6)) == P.budget_macs(CAL, 25e6, "reference")
    assert resolver.resolve({"budget_macs": 25e6, "policy": "optimal"}) == P.budget_macs(CAL, 25e6, "optimal")
    assert resolver.resolve(Budget.of(max_accuracy_drop=0.02)) == P.max_accuracy_drop(CAL, 0.02)
    assert resolver.resolve(Budget.of(max_exit=4)) == P.max_exit(CAL, 4, 5)
    explicit = resolver.resolve(Budget.of(thresholds=[0.9, None, 0.8, 0.7, 0.0]))
    assert explicit.thresholds == (0.9, math.inf, 0.8, 0.7, -math.inf)
    assert explicit.expected_accuracy is not None


def test_resolve_is_cached(resolver: BudgetResolver) -> None:
    first = resolver.resolve(Budget.of(budget_macs=33e6))
    second = resolver.resolve({"budget_macs": 33_000_000})
    assert second is first
    info = resolver.cache_info()
    assert info["hits"] == 1 and info["misses"] == 1 and info["size"] == 1


def test_cache_is_bounded() -> None:
    small = BudgetResolver(MANIFEST, CAL, cache_size=2)
    for k in (1, 2, 3):
        small.resolve(Budget.of(max_exit=k))
    assert small.cache_info()["size"] == 2


def test_errors_are_not_cached_and_raise_invalid_budget(resolver: BudgetResolver) -> None:
    for _ in range(2):
        with pytest.raises(InvalidBudgetError, match="below the cost of the first exit"):
            resolver.resolve(Budget.of(budget_macs=5e6))
        with pytest.raises(InvalidBudgetError, match="between 1 and 5"):
            resolver.resolve(Budget.of(max_exit=6))
        with pytest.raises(InvalidBudgetError, match="one value per exit"):
            resolver.resolve(Budget.of(thresholds=[0.5, 0.5]))
    assert resolver.cache_info()["size"] == 0


def test_without_calibration() -> None:
    bare = BudgetResolver(build_manifest(CAL, with_calibration=False), None)
    anytime = bare.resolve(Budget.of(max_exit=2))
    assert anytime.thresholds == (math.inf, -math.inf, -math.inf, -math.inf, -math.inf)
    assert anytime.expected_macs is None
    assert bare.resolve(Budget.of(thresholds=[0.5, None, None, None, None])).expected_accuracy is None
    with pytest.raises(InvalidBudgetError, match="budget_macs needs calibration data"):
        bare.resolve(Budget.of(budget_macs=3e7))
    with pytest.raises(InvalidBudgetError, match="max_accuracy_drop needs calibration data"):
        bare.resolve(Budget.of(max_accuracy_drop=0.01))
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
    budgets = [Budget.of(budget_macs=m) for m in (12e6, 18e6, 27e6, 35e6, 49e6)] + [Budget.of(max_accuracy_drop=0.01)]
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
