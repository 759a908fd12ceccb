"""What every policy returns (`ThresholdResult`) and how a threshold vector is scored on held-out data.

Kept apart from the policies so that scoring is written once: the reference sweep, the optimiser
and the knobs all evaluate thresholds here, with the exit rule of service.core.exit_rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.artifact import CalibrationData
from service.core.errors import InvalidBudgetError
from service.core.exit_rule import ALWAYS_EXIT, NEVER_EXIT, exit_indices, force_last_exit

#: Relative slack on MAC comparisons (sums of float MACs are not exact).
REL_TOL = 1e-9


@dataclass(frozen=True)
class ThresholdResult:
    """Per-exit thresholds plus what they are expected to do on the held-out set.

    ``expected_*`` and ``exit_fractions`` are None when no calibration data was available
    (``max_exit`` / ``explicit`` without calibration). ``expected_macs`` is the average per image.
    """

    thresholds: tuple[float, ...]
    expected_accuracy: float | None
    expected_macs: float | None
    exit_fractions: tuple[float, ...] | None
    policy: str

    @property
    def num_exits(self) -> int:
        return len(self.thresholds)

    @property
    def final_exit(self) -> int:
        """0-based index of the first exit that always answers (ALWAYS_EXIT): later stages never run."""
        for k, value in enumerate(self.thresholds):
            if value == ALWAYS_EXIT:
                return k
        return len(self.thresholds) - 1

    def as_array(self) -> np.ndarray:
        """float32 thresholds for the engine (inf/-inf kept; float32 keeps tie semantics exact)."""
        return np.asarray(self.thresholds, dtype=np.float32)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form: +inf -> None ("never exit here"), -inf -> 0.0 ("always exit here").

        Finite thresholds are written with the shortest decimal that round-trips to the same
        float32, so a client that sends them back gets exactly the same exits (ties included);
        rounding them harder would move samples across the threshold.
        """
        thresholds: list[float | None] = []
        for value in self.thresholds:
            if value == NEVER_EXIT:
                thresholds.append(None)
            elif value == ALWAYS_EXIT:
                thresholds.append(0.0)
            else:
                thresholds.append(_float32_repr(value))
        return {
            "thresholds": thresholds,
            "expected_accuracy": None if self.expected_accuracy is None else round(self.expected_accuracy, 6),
            "expected_macs": None if self.expected_macs is None else round(self.expected_macs, 1),
            "exit_fractions": None if self.exit_fractions is None else [round(f, 6) for f in self.exit_fractions],
            "policy": self.policy,
        }


def _float32_repr(value: float) -> float:
    return float(str(np.float32(value)))


def accuracy_of(r: ThresholdResult) -> float:
    """Held-out accuracy for ordering results (-1 when unknown: sorts below every real point)."""
    return -1.0 if r.expected_accuracy is None else r.expected_accuracy


def macs_of(r: ThresholdResult) -> float:
    """Held-out expected MACs for ordering results (inf when unknown: never fits a budget)."""
    return math.inf if r.expected_macs is None else r.expected_macs


def result_from_exits(
    cal: CalibrationData, thresholds: Sequence[float], exits: np.ndarray, policy: str
) -> ThresholdResult:
    """Score thresholds given the exit each held-out sample takes under them ((n,) intp)."""
    n = cal.num_samples
    counts = np.bincount(exits, minlength=cal.num_exits)  # (E,)
    fractions = counts / n
    accuracy = float(np.count_nonzero(cal.correct[exits, np.arange(n)])) / n
    macs = float(np.dot(fractions, np.asarray(cal.cumulative_macs, dtype=np.float64)))
    return ThresholdResult(
        thresholds=tuple(float(t) for t in thresholds),
        expected_accuracy=accuracy,
        expected_macs=macs,
        exit_fractions=tuple(float(f) for f in fractions),
        policy=policy,
    )


def evaluate_thresholds(cal: CalibrationData, thresholds: Sequence[float], policy: str = "explicit") -> ThresholdResult:
    """Held-out accuracy, expected MACs and exit fractions of a threshold vector.

    Each sample exits where service.core.exit_rule says (the first k with ``conf[k] >= T[k]``,
    in float32 like the engine; the last exit always answers, so ``T[-1]`` is stored as
    ALWAYS_EXIT); its correctness is that exit's; expected MACs = sum_k fraction_k *
    cumulative_macs[k].
    """
    if len(thresholds) != cal.num_exits:
        raise InvalidBudgetError(f"need {cal.num_exits} thresholds (one per exit), got {len(thresholds)}")
    values = force_last_exit([float(t) for t in thresholds])
    return result_from_exits(cal, values, exit_indices(cal.confidence, values), policy)
