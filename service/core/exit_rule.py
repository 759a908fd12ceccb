"""The early-exit rule, written once: the confidence, the exit test and "the last exit answers".

Why one module: thresholds are chosen offline on calibration confidences and applied online to
serving confidences. If the two sides compute the confidence differently (float64 then cast vs
float32) or compare differently (``>=`` vs ``>``), an image that sits exactly on a calibrated
threshold lands on the other side of it when served. So the engine, the scheduler, the threshold
policies and the export's calibration all import these functions instead of writing their own,
and calibration.npz holds, bit for bit, the confidences serving computes.

The rule: after exit k an image's confidence is ``max(softmax(F_k))`` in float32 (F_k: the
cumulative logits); it leaves at the first exit k with ``confidence >= threshold[k]`` (ties
exit; a NaN threshold never exits, since every comparison with NaN is false); the last exit
always answers, whatever its threshold says (it is stored as `ALWAYS_EXIT`).
"""

from __future__ import annotations

import math
from collections.abc import MutableSequence, Sequence
from typing import Final, TypeVar

import numpy as np

__all__ = [
    "ALWAYS_EXIT",
    "NEVER_EXIT",
    "confidence",
    "exit_indices",
    "exits",
    "force_last_exit",
    "max_softmax",
    "softmax",
]

#: Threshold that never lets an image exit (a max softmax is at most 1).
NEVER_EXIT: Final[float] = math.inf
#: Threshold that always lets an image exit: what the last exit carries.
ALWAYS_EXIT: Final[float] = -math.inf

_Thresholds = TypeVar("_Thresholds", MutableSequence[float], np.ndarray)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis in float32: (B, classes) -> (B, classes).

    float32 because that is what serving can afford per batch (and what the graphs output); the
    result is a new array (the logits are left untouched), computed in place in that one copy.
    """
    z = logits.astype(np.float32, copy=True)  # (B, classes)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def confidence(probabilities: np.ndarray) -> np.ndarray:
    """(B, classes) softmax probabilities -> (B,) float32 confidence (the largest probability)."""
    return probabilities.max(axis=-1)


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """(B, classes) logits -> (B,) float32 confidence: what calibration stores, bit for bit."""
    return confidence(softmax(logits))


def exits(conf: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """(n,) bool: which images leave, ``conf >= thresholds`` elementwise (ties exit, NaN never).

    The comparison is in float32 (thresholds are cast, which is free when they already are):
    comparing a float32 confidence with a float64 threshold would move ties across it.
    """
    return np.greater_equal(conf, np.asarray(thresholds, dtype=np.float32))


def force_last_exit(thresholds: _Thresholds) -> _Thresholds:
    """The last exit always answers: set the last threshold (last axis of an array) to ALWAYS_EXIT.

    In place, and returned for convenience; a list, or an (E,) / (B, E) array.
    """
    if isinstance(thresholds, np.ndarray):
        thresholds[..., -1] = ALWAYS_EXIT
    else:
        thresholds[-1] = ALWAYS_EXIT
    return thresholds


def exit_indices(conf: np.ndarray, thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """(E, n) confidences, (E,) thresholds -> (n,) intp: the exit each image takes.

    The first k with `exits` at k; the last exit (E - 1) when none does, whatever T[E-1] says.
    """
    num_exits, n = conf.shape
    taken = np.full(n, num_exits - 1, dtype=np.intp)  # (n,)
    t32 = np.asarray(thresholds, dtype=np.float32)  # (E,)
    for k in range(num_exits - 2, -1, -1):
        taken[exits(conf[k], t32[k])] = k
    return taken
