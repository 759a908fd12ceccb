"""Offline suite, part 2: do the budget knobs keep their promises on new images? (issue 14)

Population = every image of calibration.npz the model never trained on (held-out + test: 15,000 for
the shipped Fashion-MNIST models). Two resampling experiments, both from the calibration arrays
alone (no torch, no dataset, no ONNX Runtime), with a fixed seed so that a published run repeats:

* **coverage** (`max_accuracy_drop`): R calibration sets of the held-out size drawn i.i.d. (with
  replacement) from the population -- exactly the proof's assumption -- thresholds chosen by
  `service.core.policies` on each, and the *real* drop / MACs measured on the whole population,
  the distribution the calibration set was drawn from. A violation is a real drop above the
  allowed one. Rows: every policy of the knob as served, the rule served before issue 14
  (`previous`, kept here for comparison only) and the oracle (the cheapest frontier point chosen
  on the population itself: the best any rule can do).
* **policy comparison and MAC budgets** (`budget_macs`): the same R draws; each policy's
  thresholds from the draw, accuracy and average MACs on the population images the draw left out
  (about 10,000 for the shipped models: images the thresholds never saw); a MAC violation is more
  average MACs than the budget on them. Plus, on the shipped held-out split, how often the
  optimiser's frontier alone fell below Eq. 9 at the exact budget (what `budget_macs` now guards).

The experiment has its own noise: a violation rate measured over R draws has a binomial standard
deviation sqrt(delta (1 - delta) / R); each row carries the Clopper-Pearson 95 % upper limit of its
rate, computed with the same exact binomial code the policy uses.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Artifact, Progress

#: Allowed drops of the coverage experiment (the issue: every drop from 0.1 % to 5 %, and 0).
COVERAGE_DROPS: tuple[float, ...] = (0.0, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05)
DEFAULT_RESAMPLES = 200
#: MAC budgets of both experiments, as fractions of the way from the first exit's cost to the full cost.
BUDGET_STEPS: tuple[float, ...] = (0.03, 0.08, 0.15, 0.3, 0.6)
#: Budgets of the in-sample "below Eq. 9 at the exact budget" count on the shipped held-out split.
GAP_BUDGETS = 200
SEED = 14


def previous_drop_rule(cal: Any, drops: tuple[float, ...]) -> dict[float, tuple[float, ...]]:
    """The max_accuracy_drop rule served before issue 14, for comparison only (not served).

    Per drop: the cheapest optimiser-frontier point whose held-out correct count >= ceil(final -
    d n) and whose paired loss mean + 1.645 sd / sqrt(n) <= d -- a normal approximation applied
    after choosing among ~100 frontier points on the same images, which is why it fails coverage.
    """
    from service.core import policies

    n = cal.num_samples
    final = cal.correct[-1].astype(np.float64)  # (n,)
    z = statistics.NormalDist().inv_cdf(0.95)
    frontier = policies.optimal_frontier(cal)
    stats = []  # per frontier point: (correct count, upper bound of the paired loss)
    for point in frontier:
        assert point.expected_accuracy is not None
        d = final - cal.correct[_exits(cal.confidence, point.thresholds), np.arange(n)]  # (n,)
        stats.append((round(point.expected_accuracy * n), float(d.mean() + z * d.std(ddof=1) / math.sqrt(n))))
    out = {}
    for drop in drops:
        target = math.ceil(float(final.sum()) - drop * n - 1e-6)
        chosen = next(
            (p for p, (hits, bound) in zip(frontier, stats, strict=True) if hits >= target and bound <= drop + 1e-12),
            frontier[-1],
        )
        out[drop] = chosen.thresholds
    return out


def _exits(confidence: np.ndarray, thresholds: Any) -> np.ndarray:
    from service.core.exit_rule import exit_indices

    return exit_indices(confidence, thresholds)


def _population(artifact: Artifact) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    assert artifact.heldout is not None and artifact.test is not None
    conf = np.concatenate([artifact.heldout.confidence, artifact.test.confidence], axis=1)  # (E, N)
    correct = np.concatenate([artifact.heldout.correct, artifact.test.correct], axis=1)  # (E, N)
    return conf.astype(np.float32), correct.astype(bool), artifact.cumulative_macs, artifact.heldout.num_samples


def _score(conf: np.ndarray, correct: np.ndarray, macs: np.ndarray, thresholds: Any) -> tuple[float, float]:
    """(accuracy, average MACs) of thresholds on (conf, correct)."""
    taken = _exits(conf, thresholds)
    return float(correct[taken, np.arange(conf.shape[1])].mean()), float(macs[taken].mean())


def _summary(excess: list[float], cost: list[float], full: float, resamples: int) -> dict[str, Any]:
    """Violation rate (excess > 0), its exact 95 % upper limit, mean / p95 excess, MAC cost."""
    from service.core.policies.risk import binom_upper

    values = np.asarray(excess)  # (R,)
    violations = int(np.count_nonzero(values > 1e-12))
    costs = np.asarray(cost) / full  # (R,)
    return {
        "violations": violations,
        "violation_rate": violations / resamples,
        "violation_rate_upper95": float(binom_upper(np.array([violations]), resamples, 0.05)[0]),
        "excess_mean": float(values.mean()),
        "excess_p95": float(np.quantile(values, 0.95)),
        "macs_fraction_mean": float(costs.mean()),
        "macs_fraction_p5": float(np.quantile(costs, 0.05)),
        "macs_fraction_p95": float(np.quantile(costs, 0.95)),
    }


def _oracle_drop(pop: Any, drop: float) -> dict[str, Any]:
    """The cheapest optimiser-frontier point chosen on the population itself (no generalisation needed)."""
    from service.core import policies

    n, final = pop.num_samples, int(np.count_nonzero(pop.correct[-1]))
    target = math.ceil(final - drop * n - 1e-6)
    for point in policies.optimal_frontier(pop):
        assert point.expected_accuracy is not None and point.expected_macs is not None
        if round(point.expected_accuracy * n) >= target:
            full = float(pop.cumulative_macs[-1])
            return {"macs_fraction": point.expected_macs / full, "drop": final / n - point.expected_accuracy}
    return {"macs_fraction": 1.0, "drop": 0.0}


def _frontier_only(cal: Any, budget: float) -> tuple[float, ...]:
    """The optimiser's frontier alone at a budget (the served `budget_macs` rule before issue 14)."""
    from service.core.policies.optimiser import frontier_of, frontier_result
    from service.core.policies.prepared import prepared
    from service.core.policies.result import REL_TOL

    prep = prepared(cal)
    frontier = frontier_of(prep)
    index = int(np.searchsorted(frontier.total_macs, budget * cal.num_samples * (1 + REL_TOL), side="right")) - 1
    return frontier_result(prep, max(index, 0), "optimal").thresholds


def run_coverage(artifact: Artifact, resamples: int, progress: Progress) -> dict[str, Any]:
    """Both experiments of one model, on the same R draws (see the module docstring).

    Each draw is i.i.d. from the population (the proof's assumption): coverage truth is the whole
    population; the `budget_macs` comparison is scored on the images the draw left out (about
    e^-1 of the population when the draw is a third of it), which the thresholds never saw.
    """
    from service.core import policies
    from service.core.artifact import CalibrationData
    from service.core.knobs import DROP_CONFIDENCE

    conf, correct, macs, n_cal = _population(artifact)
    population = conf.shape[1]
    full = float(macs[-1])
    full_acc = float(correct[-1].mean())
    drop_rows: dict[str, dict[str, tuple[list[float], list[float]]]] = {
        p: {f"{d:g}": ([], []) for d in COVERAGE_DROPS} for p in ("optimal", "reference", "previous")
    }
    budgets = [float(macs[0] + s * (macs[-1] - macs[0])) for s in BUDGET_STEPS]
    names = ("optimal", "reference", "frontier_only")
    acc = {name: np.zeros((resamples, len(budgets))) for name in names}  # (R, B) accuracy on left-out images
    cost = {name: np.zeros((resamples, len(budgets))) for name in names}  # (R, B) average MACs on them
    left_out = np.zeros(resamples)  # (R,) images each draw left out
    rng = np.random.default_rng(SEED)
    with progress.task(f"coverage {artifact.manifest.name}", resamples) as advance:
        for r in range(resamples):
            idx = rng.integers(0, population, n_cal)  # (n_cal,) i.i.d. from the population
            cal = CalibrationData(conf[:, idx], correct[:, idx], macs)
            for d in COVERAGE_DROPS:
                for policy in ("optimal", "reference"):
                    chosen = policies.max_accuracy_drop(cal, d, policy).thresholds
                    a, c = _score(conf, correct, macs, chosen)
                    drop_rows[policy][f"{d:g}"][0].append(full_acc - a - d)
                    drop_rows[policy][f"{d:g}"][1].append(c)
            for d, chosen in previous_drop_rule(cal, COVERAGE_DROPS).items():
                a, c = _score(conf, correct, macs, chosen)
                drop_rows["previous"][f"{d:g}"][0].append(full_acc - a - d)
                drop_rows["previous"][f"{d:g}"][1].append(c)
            unseen = np.ones(population, dtype=bool)
            unseen[idx] = False
            left_out[r] = np.count_nonzero(unseen)
            ev_conf, ev_correct = conf[:, unseen], correct[:, unseen]
            for j, b in enumerate(budgets):
                chosen_by = {
                    "optimal": policies.budget_macs(cal, b, "optimal").thresholds,
                    "reference": policies.budget_macs(cal, b, "reference").thresholds,
                    "frontier_only": _frontier_only(cal, b),
                }
                for name, thresholds in chosen_by.items():
                    acc[name][r, j], cost[name][r, j] = _score(ev_conf, ev_correct, macs, thresholds)
            advance()
    drops = {
        policy: {d: {"allowed_drop": float(d), **_summary(*rows[d], full, resamples)} for d in rows}
        for policy, rows in drop_rows.items()
    }
    pop = CalibrationData(conf, correct, macs)
    coverage_out = {
        "resamples": resamples,
        "calibration_samples": n_cal,
        "population": population,
        "sampling": "calibration sets drawn i.i.d. (with replacement) from the population; truth = the population",
        "drop_confidence": DROP_CONFIDENCE,
        "delta": 1.0 - DROP_CONFIDENCE,
        "noise_sd_at_delta": math.sqrt(DROP_CONFIDENCE * (1.0 - DROP_CONFIDENCE) / resamples),
        "full_accuracy": full_acc,
        "max_accuracy_drop": drops,
        "oracle": {f"{d:g}": _oracle_drop(pop, d) for d in COVERAGE_DROPS},
    }
    rows = []
    for j, b in enumerate(budgets):
        diff = acc["optimal"][:, j] - acc["reference"][:, j]  # (R,)
        rows.append(
            {
                "budget": b,
                "budget_fraction": b / full,
                **{f"{name}_accuracy": float(acc[name][:, j].mean()) for name in names},
                **{f"{name}_macs_fraction": float(cost[name][:, j].mean() / full) for name in names},
                "optimal_minus_reference_mean": float(diff.mean()),
                "optimal_minus_reference_sd": float(diff.std(ddof=1)) if resamples > 1 else 0.0,
                "optimal_worse_share": float(np.mean(diff < -1e-12)),
                "optimal_better_share": float(np.mean(diff > 1e-12)),
                "macs_overshoot": {
                    name: _summary(list((cost[name][:, j] - b) / b), list(cost[name][:, j]), full, resamples)
                    for name in ("optimal", "reference")
                },
            }
        )
    all_diff = acc["optimal"] - acc["reference"]  # (R, B)
    per_draw = all_diff.mean(axis=1)  # (R,) budget-averaged difference per draw
    policies_out = {
        "resamples": resamples,
        "calibration_samples": n_cal,
        "evaluation_samples_mean": float(left_out.mean()),
        "sampling": "the coverage draws; scored on the population images each draw left out",
        "rows": rows,
        "optimal_minus_reference_mean": float(all_diff.mean()),
        "optimal_minus_reference_split_sd": float(per_draw.std(ddof=1)) if resamples > 1 else 0.0,
        "optimal_worse_share": float(np.mean(all_diff < -1e-12)),
        "optimal_better_share": float(np.mean(all_diff > 1e-12)),
        "heldout_gap": _heldout_gap(artifact),
    }
    return {"coverage": coverage_out, "policies": policies_out}


def _heldout_gap(artifact: Artifact) -> dict[str, Any]:
    """On the shipped held-out split: budgets where a policy falls below Eq. 9 at the exact budget."""
    from service.core import policies

    cal = artifact.heldout
    assert cal is not None
    macs = artifact.cumulative_macs
    worst = {"frontier_only": 0.0, "optimal": 0.0}
    below = {"frontier_only": 0, "optimal": 0}
    for b in np.linspace(macs[0], macs[-1], GAP_BUDGETS):
        reference = policies.budget_macs(cal, float(b), "reference").expected_accuracy
        assert reference is not None
        served = policies.budget_macs(cal, float(b), "optimal").expected_accuracy
        frontier = policies.evaluate_thresholds(cal, _frontier_only(cal, float(b))).expected_accuracy
        assert served is not None and frontier is not None
        for name, value in (("frontier_only", frontier), ("optimal", served)):
            if value < reference - 1e-12:
                below[name] += 1
                worst[name] = max(worst[name], reference - value)
    return {"budgets": GAP_BUDGETS, "below_eq9": below, "worst_points": worst}


# --------------------------------------------------------------------------------------------------
# report: markdown and plot (called by bench.report)
# --------------------------------------------------------------------------------------------------
def _pp(value: float) -> str:
    return f"{100 * value:+.2f}"


def coverage_lines(models: dict[str, Any], image: str | None) -> list[str]:
    """Markdown of the coverage and policy-comparison experiments (empty when the run has none)."""
    runs = {key: m["coverage"] for key, m in models.items() if m.get("coverage")}
    if not runs:
        return []
    first = next(iter(runs.values()))["coverage"]
    delta, resamples = first["delta"], first["resamples"]
    sd = first["noise_sd_at_delta"]
    lines = [
        "## Offline: do the budget knobs hold on new images? (coverage, issue 14)",
        "",
        f"Population: the {first['population']:,} images of calibration.npz (held-out + test). Coverage: "
        f"{resamples} calibration sets of {first['calibration_samples']:,} images drawn i.i.d. from it, thresholds "
        "chosen by `service.core.policies` on each, the real drop and MACs measured on the whole population. "
        f"Risk level δ = {delta:g} (`drop_confidence` {first['drop_confidence']:g}). The experiment's own noise: a "
        f"rate measured over {resamples} draws has sd {sd:.3f} at δ, so a valid rule shows up to "
        f'{delta + 2 * sd:.3f} by chance about 1 time in 40; "upper 95 %" is the Clopper-Pearson limit of each '
        "rate. `previous` = the rule served before issue 14 (normal-approximation margin on the frontier), for "
        "comparison; oracle = the cheapest thresholds chosen on the population itself.",
    ]
    for key, run in runs.items():
        cov = run["coverage"]
        rows = cov["max_accuracy_drop"]
        lines += [
            "",
            f"`max_accuracy_drop`, {key}: violation rate (upper 95 %) · mean / p95 excess of the real drop over "
            "the allowed one (pp) · average MACs (% of full)",
            "",
            "| allowed drop | optimal (served) | reference | previous | oracle MACs |",
            "|---:|---|---|---|---:|",
        ]
        for d in rows["optimal"]:

            def cell(p: dict[str, Any]) -> str:
                return (
                    f"{p['violation_rate']:.3f} ({p['violation_rate_upper95']:.3f}) · {_pp(p['excess_mean'])} / "
                    f"{_pp(p['excess_p95'])} · {100 * p['macs_fraction_mean']:.1f} %"
                )

            lines.append(
                f"| {100 * float(d):.2f} % | {cell(rows['optimal'][d])} | {cell(rows['reference'][d])} "
                f"| {cell(rows['previous'][d])} | {100 * cov['oracle'][d]['macs_fraction']:.1f} % |"
            )
    lines += [
        "",
        "`budget_macs` out of sample: the same draws, thresholds from each draw, accuracy (%) on the "
        "population images the draw left out; `frontier only` = the optimiser without the Eq. 9 "
        "comparison (served before issue 14).",
    ]
    for key, run in runs.items():
        pol = run["policies"]
        lines += [
            "",
            f"{key}: {pol['resamples']} draws; optimal − reference over all (split, budget) pairs "
            f"{_pp(pol['optimal_minus_reference_mean'])} pp (sd of the per-draw mean "
            f"{100 * pol['optimal_minus_reference_split_sd']:.2f} pp), optimal worse in "
            f"{100 * pol['optimal_worse_share']:.0f} % and better in "
            f"{100 * pol['optimal_better_share']:.0f} % of pairs",
            "",
            "| budget (% of full) | optimal | reference | frontier only | optimal − reference (pp) | worse / better |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in pol["rows"]:
            lines.append(
                f"| {100 * row['budget_fraction']:.1f} % | {100 * row['optimal_accuracy']:.2f} "
                f"| {100 * row['reference_accuracy']:.2f} | {100 * row['frontier_only_accuracy']:.2f} "
                f"| {_pp(row['optimal_minus_reference_mean'])} "
                f"| {100 * row['optimal_worse_share']:.0f} % / {100 * row['optimal_better_share']:.0f} % |"
            )
        lines += [
            "",
            f"`budget_macs` on the left-out images, {key}: share of draws whose thresholds spend more than the "
            "budget (upper 95 %) · mean / p95 relative overshoot (%)",
            "",
            "| budget (% of full) | optimal | reference |",
            "|---:|---|---|",
        ]
        for row in pol["rows"]:
            over = row["macs_overshoot"]
            lines.append(
                f"| {100 * row['budget_fraction']:.1f} % | "
                + " | ".join(
                    f"{over[name]['violation_rate']:.3f} ({over[name]['violation_rate_upper95']:.3f}) · "
                    f"{_pp(over[name]['excess_mean'])} / {_pp(over[name]['excess_p95'])}"
                    for name in ("optimal", "reference")
                )
                + " |"
            )
        gap = pol["heldout_gap"]
        lines += [
            "",
            f"On the shipped held-out split, {gap['budgets']} budgets: below Eq. 9 at the exact budget — frontier only "
            f"{gap['below_eq9']['frontier_only']} (by up to {100 * gap['worst_points']['frontier_only']:.2f} pp), "
            f"served optimal {gap['below_eq9']['optimal']}.",
        ]
    if image:
        lines += ["", f"![coverage]({image})"]
    return lines


def plot_coverage(models: dict[str, Any], out_dir: Path) -> Path | None:
    """Violation rate vs allowed drop (nominal δ and its noise band) and MAC cost, one column per model."""
    runs = {key: m["coverage"]["coverage"] for key, m in models.items() if m.get("coverage")}
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(6.2 * len(runs), 8.0), squeeze=False)
    for col, (key, cov) in enumerate(runs.items()):
        rows = cov["max_accuracy_drop"]
        drops = [100 * float(d) for d in rows["optimal"]]
        top, bottom = axes[0][col], axes[1][col]
        for policy, style in (("optimal", "o-"), ("reference", "s-"), ("previous", "x--")):
            top.plot(drops, [p["violation_rate"] for p in rows[policy].values()], style, label=policy)
            bottom.plot(drops, [100 * p["macs_fraction_mean"] for p in rows[policy].values()], style, label=policy)
        delta, sd = cov["delta"], cov["noise_sd_at_delta"]
        top.axhline(delta, color="k", lw=1, label=f"nominal δ = {delta:g}")
        top.axhspan(0, delta + 2 * sd, color="0.85", zorder=0, label="δ + 2 sd (experiment noise)")
        bottom.plot(drops, [100 * o["macs_fraction"] for o in cov["oracle"].values()], "k:", label="oracle")
        top.set_title(f"{key}: violation rate over {cov['resamples']} calibration draws")
        top.set_xlabel("allowed drop (%)")
        top.set_ylabel("P(real drop > allowed)")
        bottom.set_xlabel("allowed drop (%)")
        bottom.set_ylabel("average MACs (% of full)")
        for ax in (top, bottom):
            ax.set_xscale("symlog", linthresh=0.1)
            ax.set_xlim(left=0.0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "offline_coverage.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
