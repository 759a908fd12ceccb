"""Search state prepared once per calibration set, and the small cache that keeps it.

Why a module of its own: the reference algorithm (presorted confidences) and the optimiser (ranks,
grids, cuts) both read this state, and both store what they derive from it (the reference sweep,
the frontier) in the same per-calibration memo; keeping it below both keeps them independent.

Calibration arrays are treated as immutable: the prepared state of a `CalibrationData` object is
cached (small LRU by identity) so repeated calls cost a lookup, not a new sort or search.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import numpy as np

from service.core.artifact import CalibrationData
from service.core.exit_rule import ALWAYS_EXIT, NEVER_EXIT
from service.core.policies.result import ThresholdResult, result_from_exits

_T = TypeVar("_T")

#: Candidate cuts per exit priced by the optimiser (the grid of `Prepared.bounds`).
GRID = 512


class Prepared:
    """Sorted confidences, per-exit ranks and the lazily built derived state of one calibration set.

    A threshold vector is represented by *cuts*: cut[k] = number of distinct confidence values of
    exit k (ranked high to low) that pass, i.e. T[k] = distinct[k][cut-1] (cut 0: NEVER_EXIT).
    Samples of rank < cut exit, which is exactly the exit rule ``conf >= T`` with ties included.
    """

    def __init__(self, cal: CalibrationData) -> None:
        self.cal = cal
        self.num_exits = cal.num_exits
        self.n = cal.num_samples
        conf = np.asarray(cal.confidence, dtype=np.float32)  # (E, n)
        self.correct = np.asarray(cal.correct, dtype=np.float64)  # (E, n)
        self.macs = np.asarray(cal.cumulative_macs, dtype=np.float64)  # (E,)
        self.order: list[np.ndarray] = []  # per exit (n,): samples by descending confidence
        self.sorted_conf: list[np.ndarray] = []  # per exit (n,): confidences, descending
        self.ranks: list[np.ndarray] = []  # rank of each sample's confidence among distinct values
        self.distinct: list[np.ndarray] = []  # distinct confidences, descending
        # The optimiser prices cuts on a grid of at most GRID cut positions per exit (bounds[k],
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
            bounds = np.unique(np.linspace(0, size, min(size, GRID) + 1).round().astype(np.intp))
            self.bounds.append(bounds)
            self.bins.append(np.searchsorted(bounds, ranks, side="right") - 1)
        # Re-entrant: a memo entry may be built from another (the frontier from the reference sweep).
        self.lock = threading.RLock()
        self._memo: dict[str, Any] = {}

    def memo(self, key: str, build: Callable[[], _T]) -> _T:
        """The value stored under ``key``, built (once, under the lock) by ``build()`` if missing."""
        with self.lock:
            if key not in self._memo:
                self._memo[key] = build()
            return cast(_T, self._memo[key])

    # -- conversions ---------------------------------------------------------------------------
    def thresholds_from_cuts(self, cuts: Sequence[int] | np.ndarray) -> tuple[float, ...]:
        out = [NEVER_EXIT if c == 0 else float(self.distinct[k][c - 1]) for k, c in enumerate(cuts)]
        return (*out, ALWAYS_EXIT)

    def cuts_from_thresholds(self, thresholds: Sequence[float]) -> np.ndarray:
        cuts = np.zeros(self.num_exits - 1, dtype=np.intp)
        for k in range(self.num_exits - 1):
            t = np.float32(thresholds[k])
            # distinct is descending: count values >= t
            cuts[k] = int(np.searchsorted(-self.distinct[k], -t, side="right"))
        return cuts

    def exits_of_cuts(self, cuts: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n,) intp: the exit each sample takes under ``cuts`` (the exit rule in rank space)."""
        exits = np.full(self.n, self.num_exits - 1, dtype=np.intp)
        for k in range(self.num_exits - 2, -1, -1):
            exits = np.where(self.ranks[k] < cuts[k], k, exits)
        return exits

    def score(self, cuts: Sequence[int] | np.ndarray) -> tuple[float, float]:
        """(correct count, total MACs) on the held-out set."""
        exits = self.exits_of_cuts(cuts)
        return float(self.correct[exits, np.arange(self.n)].sum()), float(self.macs[exits].sum())

    def result(self, cuts: Sequence[int] | np.ndarray, policy: str) -> ThresholdResult:
        return result_from_exits(self.cal, self.thresholds_from_cuts(cuts), self.exits_of_cuts(cuts), policy)


# A small LRU keyed by identity. Entries hold their calibration object, so an id cannot be reused
# while its entry lives; memory is bounded by _CACHE_SIZE entries.
_CACHE: OrderedDict[int, Prepared] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 8


def prepared(cal: CalibrationData) -> Prepared:
    """The prepared state of ``cal`` (built on first use, then cached)."""
    key = id(cal)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit.cal is cal:
            _CACHE.move_to_end(key)
            return hit
    prep = Prepared(cal)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit.cal is cal:
            return hit
        _CACHE[key] = prep
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return prep
