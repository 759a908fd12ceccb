"""Offline suite: accuracy vs average MACs on the test split, from the calibration arrays only.

Protocol (the honest one): thresholds are always chosen on the *held-out* split
(`heldout_*` arrays, through `service.core.policies` — the same code the server uses) and evaluated on
the *test* split (`test_*`). Per model (BoostNet and, when given, its t=0 baseline):
  - every budgeted-MAC policy of `service.core.policies` swept over budgets from the first exit's cost
    to the full network's,
  - the accuracy-drop knob swept over drops (0 … 10 %),
  - the anytime points (everyone leaves at exit k),
  - the oracle exit (each image leaves at the first exit that classifies it correctly; an image
    no exit gets right leaves at the last exit, as in `boostserve report`) — the best accuracy any
    exit rule can reach, at close to the least MACs; the reference of the "within 1.3× of the
    oracle" target.
No ONNX Runtime, no images. With `--coverage-resamples R` (default 200) each model also gets the
coverage experiment of `bench.coverage` (do the knobs' promises hold on new images?).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import HEADLINE_DROPS, Artifact, Progress, load_artifact, simulate_exits

DROPS: tuple[float, ...] = (0.0, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1)
DEFAULT_BUDGET_POINTS = 24
#: The policy the server uses for accuracy-drop budgets (service.core.policies's default).
SERVED_POLICY = "optimal"


def budget_policies() -> list[str]:
    """Names of the budgeted-MAC policies service.core.policies offers (from its `Policy` literal)."""
    from typing import get_args

    from service.core import policies as policy

    names = [str(n) for n in get_args(getattr(policy, "Policy", None))]
    return names or ["reference", "optimal"]


def oracle(correct: np.ndarray, cumulative_macs: np.ndarray) -> dict[str, Any]:
    """First correct exit per image; images no exit gets right go to the last exit.

    Same definition as `export.report.oracle_point`, so both reports quote the same oracle. The
    stricter variant (wrong everywhere -> exit 1, the cheapest wrong answer) is recorded as
    `macs_min` for reference.
    """
    num_exits, n = correct.shape
    any_correct = correct.any(axis=0)
    first = correct.argmax(axis=0)
    exits = np.where(any_correct, first, num_exits - 1)
    strict = np.where(any_correct, first, 0)
    return {
        "accuracy": float(any_correct.mean()),
        "macs": float(cumulative_macs[exits].mean()),
        "macs_min": float(cumulative_macs[strict].mean()),
        "exit_fractions": (np.bincount(exits, minlength=num_exits) / n).tolist(),
        "definition": "first correct exit; images wrong at every exit take the last exit (as export.report)",
    }


def _point(artifact: Artifact, result: Any, policy_name: str, budget: float) -> dict[str, Any]:
    """One curve point: thresholds from held-out, evaluated on test (and cross-checked)."""
    from service.core import policies as policy

    assert artifact.test is not None
    thresholds = [float(t) for t in result.thresholds]
    served = policy.evaluate_thresholds(artifact.test, thresholds)
    # Both come from calibration data, so every expectation is filled in.
    assert served.expected_accuracy is not None and served.expected_macs is not None
    assert served.exit_fractions is not None
    assert result.expected_accuracy is not None and result.expected_macs is not None
    check = simulate_exits(artifact.test.confidence, artifact.test.correct, thresholds, artifact.cumulative_macs)
    mismatch = max(
        abs(float(served.expected_accuracy) - check["accuracy"]),
        abs(float(served.expected_macs) - check["macs"]) / max(artifact.full_macs, 1.0),
    )
    all_stages = float(artifact.test.correct[-1].mean())
    return {
        "policy": policy_name,
        "budget": budget,
        "thresholds": thresholds,
        "heldout_accuracy": float(result.expected_accuracy),
        "heldout_macs": float(result.expected_macs),
        "test_accuracy": float(served.expected_accuracy),
        "test_macs": float(served.expected_macs),
        "test_exit_fractions": [float(f) for f in served.exit_fractions],
        "accuracy_loss": all_stages - float(served.expected_accuracy),
        "macs_fraction_of_full": float(served.expected_macs) / artifact.full_macs,
        "crosscheck_max_abs_diff": mismatch,
    }


def analyse(artifact: Artifact, budget_points: int, progress: Progress) -> dict[str, Any]:
    """Every curve of one model; raises if the artifact lacks held-out or test calibration arrays."""
    from service.core import policies as policy
    from service.core.errors import BoostServeError

    if artifact.heldout is None or artifact.test is None:
        raise ValueError(f"{artifact.path}: the offline suite needs heldout_* and test_* arrays in calibration.npz")
    manifest = artifact.manifest
    macs = artifact.cumulative_macs
    num_exits = manifest.num_stages
    test = artifact.test
    heldout = artifact.heldout
    curves: dict[str, list[dict[str, Any]]] = {}
    skipped: list[dict[str, Any]] = []

    budgets = np.linspace(macs[0], macs[-1], budget_points)
    names = budget_policies()
    with progress.task(f"offline {manifest.name}", len(names) * (len(budgets) + len(DROPS))) as advance:
        for name in names:
            points = []
            for budget in budgets:
                try:
                    result = policy.budget_macs(heldout, float(budget), name)
                except (BoostServeError, ValueError) as exc:
                    skipped.append({"policy": name, "budget": float(budget), "error": str(exc)})
                else:
                    points.append(_point(artifact, result, name, float(budget)))
                advance()
            curves[name] = points
        for name in names:
            knob = []
            for drop in DROPS:
                try:
                    result = policy.max_accuracy_drop(heldout, drop, name)
                except (BoostServeError, ValueError) as exc:
                    skipped.append({"policy": f"max_accuracy_drop/{name}", "budget": drop, "error": str(exc)})
                else:
                    knob.append(_point(artifact, result, f"max_accuracy_drop/{name}", drop))
                advance()
            curves[f"max_accuracy_drop/{name}"] = knob

    anytime = [
        {
            "exit": k + 1,
            "macs": float(macs[k]),
            "test_accuracy": float(test.correct[k].mean()),
            "heldout_accuracy": float(heldout.correct[k].mean()),
        }
        for k in range(num_exits)
    ]
    # The knob as the server applies it: the default policy of service.core.policies.max_accuracy_drop.
    served_knob = curves.get(f"max_accuracy_drop/{SERVED_POLICY}", [])
    headline = {f"{d:g}": next((p for p in served_knob if math.isclose(p["budget"], d)), None) for d in HEADLINE_DROPS}
    orc = oracle(test.correct, macs)
    return {
        "artifacts": str(artifact.path),
        "name": manifest.name,
        "version": manifest.version,
        "t": manifest.exit_rule.t,
        "num_exits": num_exits,
        "cumulative_macs": macs.tolist(),
        "full_macs": artifact.full_macs,
        "heldout_samples": heldout.num_samples,
        "test_samples": test.num_samples,
        "all_stages": {"accuracy": float(test.correct[-1].mean()), "macs": artifact.full_macs},
        "anytime": anytime,
        "oracle": orc,
        "curves": curves,
        "headline": headline,
        "skipped_budgets": skipped,
        "max_crosscheck_diff": max((p["crosscheck_max_abs_diff"] for pts in curves.values() for p in pts), default=0.0),
    }


def run_offline(
    artifacts: Path,
    baseline: Path | None,
    *,
    budget_points: int,
    progress: Progress,
    coverage_resamples: int = 0,
) -> dict[str, Any]:
    """The suite's JSON body (machine info and settings are added by the caller).

    ``coverage_resamples`` > 0 adds each model's coverage experiment (`bench.coverage`) under its
    ``coverage`` key.
    """
    from bench.coverage import run_coverage

    paths = {"boostnet": artifacts, **({"baseline": baseline} if baseline is not None else {})}
    models: dict[str, Any] = {}
    for key, path in paths.items():
        artifact = load_artifact(path)
        models[key] = analyse(artifact, budget_points, progress)
        if coverage_resamples > 0:
            models[key]["coverage"] = run_coverage(artifact, coverage_resamples, progress)
    return {"models": models}
