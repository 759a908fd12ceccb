"""Threshold policies: turn a compute budget into per-exit confidence thresholds.

Everything here is a pure, deterministic function of the held-out calibration data
(`service.core.artifact.CalibrationData`: confidence (E, n), correct (E, n), cumulative_macs (E,)).
numpy only, so `export/` and the offline tools can use it without the serving stack.

Exit rule (service.core.exit_rule, shared with the engine): a sample exits at the first exit k
with ``confidence[k] >= thresholds[k]``; the last exit always answers. Threshold values:

* a float in [0, 1]   exit here when the confidence reaches it (ties exit);
* ``NEVER_EXIT``      (+inf) never exit here;
* ``ALWAYS_EXIT``     (-inf) always exit here (the last exit; also every exit from k on for ``max_exit(k)``).

Policies (see docs/policies.md for the why and the measurements):

* :func:`budget_macs` ``policy="reference"`` -- the BoostNet paper: solve Eq. 9 for the exit
  probability p, thresholds by the reference code's held-out loop (:func:`reference_thresholds`),
  plus the reference code's geometric sweep (:func:`reference_family`) and the flat-curve rule.
* :func:`budget_macs` ``policy="optimal"`` -- our optimiser: searches threshold vectors directly
  to maximise held-out accuracy subject to held-out expected MACs <= budget. It is seeded with
  every reference point and compared with the Eq. 9 answer at the exact budget, so it is never
  worse than the reference on held-out data.
* :func:`max_accuracy_drop` -- seed 001's knob with a finite-sample guarantee: the cheapest point
  of a fixed threshold path that fixed-sequence testing with exact binomial tests certifies, so
  that P(drop on new images > drop) <= 1 - drop_confidence (`risk`).
* :func:`max_exit` -- anytime mode: every sample answers at exit k; later stages never run.
* :func:`explicit` -- user-given thresholds, validated and evaluated.

Modules, by concern (this package re-exports the public names):

* `result`     -- `ThresholdResult` and `evaluate_thresholds` (scoring a threshold vector);
* `reference`  -- the paper's algorithm: Eq. 9, the held-out loop, the geometric sweep, flat curve;
* `prepared`   -- per-calibration search state (sorted confidences, ranks) and its small cache;
* `optimiser`  -- our frontier search over that state;
* `risk`       -- the accuracy-drop guarantee: the fixed path, exact binomial tests, fixed-sequence testing;
* `knobs`      -- the public knobs above, with their validation.
"""

from __future__ import annotations

from service.core.knobs import DROP_CONFIDENCE
from service.core.policies.knobs import (
    Policy,
    budget_macs,
    explicit,
    max_accuracy_drop,
    max_exit,
)
from service.core.policies.optimiser import optimal_frontier
from service.core.policies.reference import (
    REFERENCE_SWEEP,
    eq9_exit_probability,
    flat_curve,
    geometric_exit_probs,
    reference_family,
    reference_family_probs,
    reference_thresholds,
)
from service.core.policies.result import ThresholdResult, evaluate_thresholds
from service.core.policies.risk import certified_drop

__all__ = [
    "DROP_CONFIDENCE",
    "REFERENCE_SWEEP",
    "Policy",
    "ThresholdResult",
    "budget_macs",
    "certified_drop",
    "eq9_exit_probability",
    "evaluate_thresholds",
    "explicit",
    "flat_curve",
    "geometric_exit_probs",
    "max_accuracy_drop",
    "max_exit",
    "optimal_frontier",
    "reference_family",
    "reference_family_probs",
    "reference_thresholds",
]
