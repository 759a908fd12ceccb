"""A `max_accuracy_drop` that holds on new images: fixed-sequence testing with exact binomial tests.

The promise: with risk level delta (`drop_confidence` = 1 - delta), the thresholds returned for an
allowed drop d satisfy P(drop on new images from the calibration distribution > d) <= delta, where
the probability is over the draw of the n calibration images and "drop" is the full network's
accuracy minus the thresholds' accuracy on that distribution. Finite-sample, no normal
approximation. The proof sketch is in docs/policies.md; in short:

1. **A path fixed before any data is seen** (Learn-then-Test, Angelopoulos et al. 2021; CALM,
   Schuster et al. 2022): ``PATH_POINTS`` threshold vectors ordered from the full network to
   everyone-at-exit-1. Point j has the uncertainty ``u_j`` (log-spaced from 1e-7 to 1) and
   threshold ``1 - u_j * scale**k`` at exit k (clipped at 0): `scale` 2 (policy "optimal": each
   later exit accepts twice the uncertainty, because its answers are better and continuing costs
   more) or 1 (policy "reference": one shared threshold, CALM's family). The path depends on no
   calibration data at all, not even on the confidences, so each point's drop is a fixed number
   and the tests below are about fixed hypotheses.
2. **One exact level-delta test per point**, of H_j: drop_j > d. Per calibration image, the exit
   either keeps the full network's answer's correctness, loses it (full right, exit wrong: a) or
   gains it (full wrong, exit right: b). With q = P(answer changes correctness) and pi =
   P(loss | change), drop = q (2 pi - 1). The test splits delta into ``Q_SHARE`` * delta for a
   Clopper-Pearson upper bound q_U of q (m = a + b ~ Binomial(n, q)) and the rest for an exact
   binomial test of pi <= pi* = (1 + d / q_U) / 2 given m (a | m ~ Binomial(m, pi)). Under H_j
   either q_U < q (probability <= Q_SHARE * delta) or pi > pi*, and then the binomial p-value is
   <= the rest with probability <= the rest. Gains count (the drop is a difference, not the loss
   alone), which is why the test is not the plain Binomial(n, d) test of the losses.
3. **Fixed-sequence testing**: walk the path from the full network and stop at the first point
   the test does not certify; answer with the last certified one (the full network when none).
   The first false hypothesis on the path is reached only through its own test, so the
   family-wise error is <= delta (no multiplicity correction needed along a fixed order).

Edge cases fall out of the test: d = 0 certifies only points with evidence of being *better*
than the full network; a calibration set too small to certify anything gives the full network.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Final

import numpy as np

from service.core.artifact import CalibrationData
from service.core.errors import InvalidBudgetError
from service.core.exit_rule import ALWAYS_EXIT, NEVER_EXIT
from service.core.knobs import DROP_CONFIDENCE
from service.core.policies.prepared import Prepared, prepared
from service.core.policies.result import ThresholdResult, evaluate_thresholds

#: Points on the fixed path (full network excluded); log-spaced uncertainties 1e-7 .. 1.
PATH_POINTS: Final[int] = 400
#: Per policy: how much more uncertainty each later exit accepts (threshold 1 - u * scale**k).
PATH_SCALE: Final[dict[str, float]] = {"optimal": 2.0, "reference": 1.0}
#: Share of delta spent on the upper bound of q = P(answer changes); the rest tests P(loss | change).
Q_SHARE: Final[float] = 0.3
_BLOCK = 50  # path points tested per step of the fixed sequence

__all__ = [
    "PATH_POINTS",
    "PATH_SCALE",
    "Q_SHARE",
    "binom_cdf",
    "binom_upper",
    "certified_drop",
    "certified_mask",
    "path_counts",
    "risk_path",
]


# --------------------------------------------------------------------------------------------------
# exact binomial arithmetic (numpy only: the service has no scipy)
# --------------------------------------------------------------------------------------------------
_LOG_FACT = np.zeros(1)
_LOG_FACT_LOCK = threading.Lock()


def _log_factorials(n: int) -> np.ndarray:
    """log(i!) for i = 0..n (at least), grown on demand and shared."""
    global _LOG_FACT
    table = _LOG_FACT
    if len(table) <= n:
        with _LOG_FACT_LOCK:
            if len(_LOG_FACT) <= n:
                size = max(2 * n + 2, 1024)
                _LOG_FACT = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, size, dtype=np.float64)))])
            table = _LOG_FACT
    return table


def binom_cdf(k: np.ndarray | int, n: np.ndarray | int, p: np.ndarray | float) -> np.ndarray:
    """P(Binomial(n, p) <= k), elementwise (broadcast), exact up to float rounding.

    Summed in log space over i = 0..k (terms below the largest by 1e-300 vanish harmlessly); cost
    is proportional to the largest k, which stays small here (counts of changed answers).
    """
    kk, nn, pp = np.broadcast_arrays(
        np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64), np.asarray(p, dtype=np.float64)
    )
    shape = kk.shape
    kk, nn, pp = kk.ravel(), nn.ravel(), pp.ravel()  # (M,)
    out = np.ones(kk.shape, dtype=np.float64)
    live = (kk < nn) & (kk >= 0)
    out[kk < 0] = 0.0
    if live.any():
        k_, n_, p_ = kk[live], nn[live], pp[live]
        lf = _log_factorials(int(n_.max()))
        i = np.arange(int(k_.max()) + 1)  # (W,)
        ii = np.minimum(i[None, :], n_[:, None])  # (M, W)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_p = np.where(ii > 0, ii * np.log(p_)[:, None], 0.0)
            log_q = np.where(n_[:, None] - ii > 0, (n_[:, None] - ii) * np.log1p(-p_)[:, None], 0.0)
        terms = lf[n_][:, None] - lf[ii] - lf[n_[:, None] - ii] + log_p + log_q  # (M, W)
        terms = np.where(i[None, :] <= k_[:, None], terms, -np.inf)
        top = terms.max(axis=1)
        top = np.where(np.isfinite(top), top, 0.0)
        total = np.exp(top) * np.exp(terms - top[:, None]).sum(axis=1)
        out[live] = np.minimum(np.nan_to_num(total, nan=0.0), 1.0)
    return out.reshape(shape)


def binom_upper(k: np.ndarray | int, n: int, delta: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound: the p with P(Binomial(n, p) <= k) = delta (1 when k >= n).

    Bisection (45 halvings: below 3e-14, far under any count's worth); the upper end of the bracket
    is returned, so rounding errs on the safe side. P(X <= k) decreases in p, so for every true p,
    P(bound < p) <= delta.
    """
    kk = np.asarray(k, dtype=np.int64)
    lo = np.clip(kk / max(n, 1), 0.0, 1.0).astype(np.float64)
    hi = np.ones(kk.shape, dtype=np.float64)
    for _ in range(45):
        mid = 0.5 * (lo + hi)
        above = binom_cdf(kk, n, mid) > delta  # mid still plausible: the bound is higher
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    return np.where(kk >= n, 1.0, hi)


# Upper bounds of q per (n, delta): the counts repeat across drops and requests.
_Q_CACHE: OrderedDict[tuple[int, float], dict[int, float]] = OrderedDict()
_Q_LOCK = threading.Lock()


def _q_upper(m: np.ndarray, n: int, delta: float) -> np.ndarray:
    """binom_upper(m, n, delta) through a small per-(n, delta) memo of the counts already seen."""
    key = (n, delta)
    with _Q_LOCK:
        memo = _Q_CACHE.setdefault(key, {})
        _Q_CACHE.move_to_end(key)
        while len(_Q_CACHE) > 16:
            _Q_CACHE.popitem(last=False)
        missing = sorted({int(v) for v in np.unique(m)} - memo.keys())
    if missing:
        values = binom_upper(np.asarray(missing), n, delta)
        with _Q_LOCK:
            memo.update(zip(missing, (float(v) for v in values), strict=True))
    with _Q_LOCK:
        return np.array([memo[int(v)] for v in m], dtype=np.float64)


def certified_mask(losses: np.ndarray, gains: np.ndarray, n: int, drop: float, delta: float) -> np.ndarray:
    """(J,) bool: the level-delta test of "drop_j > drop" rejects at each point (see the module doc).

    ``losses`` (a) and ``gains`` (b) count, per point, the calibration images whose correctness
    the exit loses or gains against the full network.
    """
    a = np.asarray(losses, dtype=np.int64)
    m = a + np.asarray(gains, dtype=np.int64)  # (J,) changed answers
    q_upper = _q_upper(m, n, Q_SHARE * delta)  # (J,)
    trivially = drop >= q_upper  # drop <= q <= q_U <= d
    pi_star = np.clip(0.5 * (1.0 + drop / np.maximum(q_upper, 1e-300)), 0.0, 1.0)
    test = np.zeros(a.shape, dtype=bool)
    todo = ~trivially & (m > 0) & (pi_star < 1.0)
    if todo.any():
        test[todo] = binom_cdf(a[todo], m[todo], pi_star[todo]) <= (1.0 - Q_SHARE) * delta
    return trivially | test


# --------------------------------------------------------------------------------------------------
# the fixed path and the procedure
# --------------------------------------------------------------------------------------------------
def risk_path(num_exits: int, scale: float) -> np.ndarray:
    """(PATH_POINTS, E) float32 thresholds, full network first excluded, cheapest last (see module doc).

    Along the path every threshold only decreases, so each image exits at the same exit or an
    earlier one: cost falls monotonically, the last point sends everyone out at exit 1.
    """
    uncertainty = np.logspace(-7.0, 0.0, PATH_POINTS)  # (J,)
    powers = scale ** np.arange(num_exits - 1, dtype=np.float64)  # (E-1,)
    path = np.empty((PATH_POINTS, num_exits), dtype=np.float32)
    path[:, :-1] = np.clip(1.0 - uncertainty[:, None] * powers[None, :], 0.0, 1.0)
    path[:, -1] = ALWAYS_EXIT
    return path


def path_counts(confidence: np.ndarray, correct: np.ndarray, path: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E, n) confidences and correctness, (J, E) nested path -> (losses (J,), gains (J,)) against the last exit.

    Nested (every threshold non-increasing along the path, as `risk_path` builds it): an image
    passes exit k from the first point ``j_k`` with ``conf >= path[j, k]`` on, and answers at the
    smallest such k. So each exit k holds an image over one interval of points, [j_k, min of j_k'
    over earlier exits k' < k), the last exit before all of them; the counts are sums of per-image
    intervals (difference arrays), O(n E) instead of the O(J n E) of evaluating every point.
    """
    num_exits, n = confidence.shape
    points = path.shape[0]
    right = np.asarray(correct, dtype=bool)  # (E, n)
    full = right[-1]  # (n,)
    loss = (full[None, :] & ~right).astype(np.float64)  # (E, n): answering at k loses the full network's right answer
    gain = (~full[None, :] & right).astype(np.float64)  # (E, n)
    starts = np.empty((num_exits, n), dtype=np.intp)  # first point at which exit k would take the image
    for k in range(num_exits - 1):
        ascending = -np.asarray(path[:, k], dtype=np.float32)  # (J,) non-decreasing
        starts[k] = np.searchsorted(ascending, -np.asarray(confidence[k], dtype=np.float32), side="left")
    starts[-1] = 0
    losses = np.zeros(points + 1)
    gains = np.zeros(points + 1)
    earliest = np.full(n, points, dtype=np.intp)  # min over earlier exits of their start
    for k in range(num_exits - 1):
        begin = starts[k]
        end = earliest
        held = begin < end  # (n,) exit k answers on [begin, end)
        for counts, flag in ((losses, loss[k]), (gains, gain[k])):
            weight = flag * held
            counts += np.bincount(begin, weight, points + 1) - np.bincount(end, weight, points + 1)
        earliest = np.minimum(earliest, begin)
    # the last exit answers on [0, earliest): its own losses and gains are zero by definition
    return np.rint(np.cumsum(losses)[:points]).astype(np.int64), np.rint(np.cumsum(gains)[:points]).astype(np.int64)


def _counts(prep: Prepared, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    def build() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        path = risk_path(prep.num_exits, scale)
        losses, gains = path_counts(np.asarray(prep.cal.confidence, dtype=np.float32), prep.cal.correct, path)
        return path, losses, gains

    return prep.memo(f"risk_path/{scale!r}", build)


def _check_confidence(confidence: float) -> float:
    value = float(confidence)
    if not 0.0 < value < 1.0:  # also NaN
        raise InvalidBudgetError(f"drop_confidence must be in (0, 1), got {confidence!r}")
    return value


def certified_index(cal: CalibrationData, drop: float, policy: str, confidence: float) -> int:
    """Index on `risk_path` of the answer (-1: the full network), by fixed-sequence testing."""
    prep = prepared(cal)
    _, losses, gains = _counts(prep, PATH_SCALE[policy])
    # Test in blocks from the full-network end and stop at the first failure: points after it
    # do not matter, and their exact bounds are the expensive part.
    for start in range(0, len(losses), _BLOCK):
        block = slice(start, start + _BLOCK)
        passed = certified_mask(losses[block], gains[block], prep.n, drop, 1.0 - confidence)
        failed = np.flatnonzero(~passed)
        if failed.size:
            return start + int(failed[0]) - 1
    return len(losses) - 1


def certified_drop(
    cal: CalibrationData, drop: float, policy: str = "optimal", confidence: float = DROP_CONFIDENCE
) -> ThresholdResult:
    """The cheapest point of the policy's fixed path that fixed-sequence testing certifies for ``drop``.

    ``drop`` in [0, 1] and ``policy`` are validated by the caller (`policies.knobs.max_accuracy_drop`);
    ``confidence`` (1 - delta) must be in (0, 1). Expected values are the held-out ones of the answer.
    """
    level = _check_confidence(confidence)
    if policy not in PATH_SCALE:
        raise InvalidBudgetError(f"policy must be one of {', '.join(PATH_SCALE)}, got {policy!r}")
    index = certified_index(cal, drop, policy, level)
    if index < 0:
        thresholds = [NEVER_EXIT] * (cal.num_exits - 1) + [ALWAYS_EXIT]
    else:
        path = _counts(prepared(cal), PATH_SCALE[policy])[0]
        thresholds = [float(t) for t in path[index]]
    return evaluate_thresholds(cal, thresholds, policy)
