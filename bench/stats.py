"""Small, dependency-free summaries used by every suite (percentiles, median and spread)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def percentiles(values: Sequence[float] | np.ndarray, qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """{"p50": ..., "p95": ..., "p99": ...}; NaN for an empty sample (never raises mid-report)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {f"p{q:g}": math.nan for q in qs}
    return {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and relative half-range of repeated measurements (rounds).

    Why median + min/max rather than mean ± std: with 3–7 interleaved rounds on a shared machine
    the distribution is skewed by interference; the median is robust and min/max show the noise.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "rel_spread": math.nan, "n": 0}
    med = float(np.median(arr))
    lo, hi = float(arr.min()), float(arr.max())
    rel = (hi - lo) / (2 * med) if med > 0 else math.nan
    return {"median": med, "min": lo, "max": hi, "rel_spread": rel, "n": int(arr.size)}


def safe_ratio(num: float | None, den: float | None) -> float:
    """num / den, NaN when either side is missing or den is 0 (a missing cell must not crash the report)."""
    if num is None or den is None or den == 0 or math.isnan(num) or math.isnan(den):
        return math.nan
    return float(num) / float(den)


def jsonable(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays and non-finite floats into strict-JSON values.

    NaN -> None, +inf -> "inf", -inf -> "-inf" (JSON has no infinities; thresholds use them).
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    return obj
