"""LiveOperatingPoint: base, adjustments by owner, degradation; requests with their own budget untouched."""

from __future__ import annotations

import pytest

from service.core.budget import BudgetResolver, ResolvedBudget
from service.core.knobs import Budget, RequestOptions
from service.core.live import LiveOperatingPoint
from tests.fixtures.synthetic_calibration import synthetic_calibration
from tests.service.test_thresholds_cli import build_manifest

CAL = synthetic_calibration(5, 800, 9, cumulative_macs=[10e6, 20e6, 30e6, 40e6, 50e6])
MANIFEST = build_manifest(CAL)
BASE = Budget.of(budget_macs=30e6)


@pytest.fixture()
def live() -> LiveOperatingPoint:
    resolver = BudgetResolver(MANIFEST, CAL)
    return LiveOperatingPoint(resolver, ResolvedBudget(BASE, resolver.resolve(BASE), True))


def test_adjustment_serves_its_thresholds_under_the_budget_as_given(live: LiveOperatingPoint) -> None:
    seen: list[ResolvedBudget] = []
    live.subscribe(seen.append)
    moved = Budget.of(budget_macs=35e6)
    current = live.adjust("macs", moved)
    assert current.budget == BASE and current.effective == moved and not current.degraded
    assert current.thresholds == live.resolver.resolve(moved)
    assert live.adjusted is current and live.adjustment("macs") == moved
    assert seen == [live.base, current]
    live.adjust("macs", None)
    assert live.current is live.base and live.adjustment("macs") is None


def test_most_expensive_adjustment_wins(live: LiveOperatingPoint) -> None:
    live.adjust("macs", Budget.of(budget_macs=25e6))
    live.adjust("drift", Budget.of(budget_macs=40e6))
    assert live.current.effective == Budget.of(budget_macs=40e6)
    live.adjust("drift", None)
    assert live.current.effective == Budget.of(budget_macs=25e6)


def test_degradation_only_when_cheaper_and_flags_degraded(live: LiveOperatingPoint) -> None:
    cheap = Budget.of(max_accuracy_drop=0.2)
    assert live.resolver.resolve(cheap).expected_macs < live.base.thresholds.expected_macs  # the test's premise
    current = live.degrade(cheap)
    assert current.degraded and current.effective == cheap and current.budget == BASE
    assert live.adjusted is live.base  # rung 0 of the SLO ladder is not the degraded point
    live.degrade(Budget.of(max_exit=5))  # the full network: not cheaper, ignored
    assert live.current is live.base and not live.degraded
    live.degrade(cheap)
    live.rebase(ResolvedBudget(BASE, live.resolver.resolve(BASE), True))
    assert not live.degraded and live.current.effective is None


def test_a_request_with_its_own_budget_is_never_moved() -> None:
    """ClassifyService._resolve: own budget exactly as given; global requests get the live point."""
    from service.core.classify import ClassifyService

    resolver = BudgetResolver(MANIFEST, CAL)
    base = ResolvedBudget(BASE, resolver.resolve(BASE), True)
    service = ClassifyService.__new__(ClassifyService)  # only the budget part is exercised
    service.resolver, service.global_budget = resolver, base
    service.live = LiveOperatingPoint(resolver, base)
    service.live.degrade(Budget.of(max_accuracy_drop=0.2))
    own = Budget.of(budget_macs=30e6)
    mine = service._resolve(RequestOptions(budget=own))
    assert mine.budget == own and mine.effective is None and not mine.degraded
    assert mine.thresholds == resolver.resolve(own)
    assert service._resolve(RequestOptions()) is service.live.current
    all_stages = service._resolve(RequestOptions(early_exit=False))
    assert not all_stages.degraded and all_stages.thresholds == base.thresholds
