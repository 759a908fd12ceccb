"""`LiveOperatingPoint`: which thresholds the requests on the global budget get right now.

Why a layer of its own: the global budget used to be a constant (resolved once when set, by the
settings, a PUT or the budget file). On live traffic the promise of that budget can need other
thresholds than the held-out split chose: the image mix drifts (a `budget_macs` spends more or
less than the budget), the traffic drifts away from the calibration (a `max_accuracy_drop` loses
more than it should), or the server is overloaded (SLO mode trades accuracy, down to a floor, for
queueing delay). Each of those is a controller; this object is the one place where their requests
meet and become the `ResolvedBudget` that `ClassifyService` hands to requests on the global budget.

The contract (what callers may rely on):

* ``base``: the global budget as set, resolved on the held-out split. `rebase` (a new global budget)
  drops every adjustment and the degradation: the controllers start again from the new budget.
* **Adjustments** (`adjust(owner, budget)`): a controller that keeps the global budget's *own*
  promise on live traffic asks for another point of the calibrated frontier: the live MAC
  controller (owner ``"macs"``) re-resolves a `budget_macs` at another held-out budget; a drift
  monitor (owner ``"drift"``, e.g. the shadow-sampling monitor) tightens a `max_accuracy_drop` to a
  more expensive point. ``budget=None`` withdraws the owner's request. With several owners at once,
  the most expensive point (highest held-out expected MACs) wins: each owner asks for what its own
  promise needs, and more MACs never break a MAC-independent accuracy promise while the MAC owner
  only acts on `budget_macs` budgets.
  The adjusted point (or ``base`` without one) is `adjusted`; answers show it as ``effective`` and
  ``degraded`` stays false.
* **Degradation** (`degrade(budget)`, SLO mode only): a cheaper point than `adjusted`, chosen by the
  SLO controller from its ladder (every rung within the floor). It is served while set; answers
  carry ``degraded: true`` and the rung as ``effective``. A degradation that is not cheaper than
  `adjusted` is ignored (overload never buys accuracy).
* Requests that carry their own budget never see any of this: `ClassifyService` resolves theirs
  with the `BudgetResolver` exactly as given.

Everything here runs on the event loop (no locks); resolving a new point can take tens of
milliseconds (a new `budget_macs` reference answer), so a controller resolves with
`resolver.resolve` in a worker thread first (the resolver is thread-safe and caches) and then calls
`adjust` / `degrade`, which resolve again from the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from service.core.budget import BudgetResolver, ResolvedBudget
from service.core.knobs import Budget

__all__ = ["LiveOperatingPoint", "PointListener"]

log = logging.getLogger("boostserve.live")

#: Told of every change of the point in force (the metrics' gauges, the tests).
PointListener = Callable[[ResolvedBudget], None]


class LiveOperatingPoint:
    """The global budget's point in force: base, adjustments by owner, and the SLO degradation."""

    def __init__(self, resolver: BudgetResolver, base: ResolvedBudget) -> None:
        self.resolver = resolver
        self._base = base
        self._adjustments: dict[str, ResolvedBudget] = {}
        self._degraded: ResolvedBudget | None = None
        self._current = base
        self._adjusted = base
        self._listeners: list[PointListener] = []

    # -- reading -------------------------------------------------------------------------------------
    @property
    def base(self) -> ResolvedBudget:
        """The global budget as set (held-out thresholds)."""
        return self._base

    @property
    def adjusted(self) -> ResolvedBudget:
        """`base` moved by the adjustments (never degraded): rung 0 of the SLO ladder."""
        return self._adjusted

    @property
    def current(self) -> ResolvedBudget:
        """What a request on the global budget gets now (a new object on every change)."""
        return self._current

    @property
    def degraded(self) -> bool:
        return self._current.degraded

    def adjustment(self, owner: str) -> Budget | None:
        """The budget `owner` asked for, or None."""
        held = self._adjustments.get(owner)
        return None if held is None else held.effective

    def subscribe(self, listener: PointListener) -> None:
        """Call `listener(current)` now and after every change."""
        self._listeners.append(listener)
        listener(self._current)

    # -- writing -------------------------------------------------------------------------------------
    def rebase(self, base: ResolvedBudget) -> None:
        """A new global budget: every adjustment and the degradation are dropped."""
        self._base = base
        self._adjustments.clear()
        self._degraded = None
        self._recompose()

    def adjust(self, owner: str, budget: Budget | None) -> ResolvedBudget:
        """Serve `budget`'s thresholds on the global budget on behalf of `owner` (None withdraws).

        Raises InvalidBudgetError for a budget the model cannot resolve (nothing changes then).
        """
        if budget is None:
            self._adjustments.pop(owner, None)
        else:
            thresholds = self.resolver.resolve(budget)
            self._adjustments[owner] = ResolvedBudget(self._base.budget, thresholds, self._base.early_exit, budget)
        self._recompose()
        return self._current

    def degrade(self, budget: Budget | None) -> ResolvedBudget:
        """SLO mode: serve the cheaper `budget` (None: back to `adjusted`)."""
        if budget is None:
            self._degraded = None
        else:
            thresholds = self.resolver.resolve(budget)
            self._degraded = ResolvedBudget(self._base.budget, thresholds, self._base.early_exit, budget, degraded=True)
        self._recompose()
        return self._current

    def _recompose(self) -> None:
        adjusted = self._base
        if self._adjustments:
            adjusted = max(self._adjustments.values(), key=lambda r: _macs(r, default=0.0))
        degraded = self._degraded
        if degraded is not None and _macs(degraded, default=float("inf")) >= _macs(adjusted, default=float("inf")):
            degraded = None  # not cheaper: overload never buys accuracy
        new = adjusted if degraded is None else degraded
        self._adjusted = adjusted
        if new is self._current:
            return
        self._current = new
        if new.effective is not None:
            log.info(
                "global budget %s served at %s%s",
                new.budget.describe(),
                new.effective.describe(),
                " (degraded: overload)" if new.degraded else "",
            )
        for listener in self._listeners:
            try:
                listener(new)
            except Exception:  # a listener (metrics) must never break serving
                log.exception("live operating point listener failed")


def _macs(resolved: ResolvedBudget, default: float) -> float:
    macs = resolved.thresholds.expected_macs
    return default if macs is None else float(macs)
