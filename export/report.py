"""Accuracy vs average MACs on the test split, thresholds chosen on the held-out split.

For each artifact (a BoostNet, optionally a t=0 baseline to overlay like the paper's Fig. 4):
  - reference: `budget_macs(policy="reference")` over a grid of budgets (Eq. 9 + the reference
    code's geometric family + flat-curve rule), and the raw 39-point reference family;
  - optimal:   `budget_macs(policy="optimal")` over the same grid (our optimiser);
  - drop knob: `max_accuracy_drop(drop)` over a grid of allowed drops;
  - anytime:   `max_exit(k)` for every exit (each sample answers at exit k);
  - oracle:    each test sample at its first correct exit (wrong everywhere -> last exit), an
               upper bound no confidence threshold can beat.
Every threshold vector is chosen on held-out data only and then evaluated on test data with
`evaluate_thresholds` (same exit rule and float32 comparisons as the engine).

Test data: the calibration file already holds the engine's test-split confidences. They are
reused when the test split loaded from --data hashes to what the export recorded
(provenance.dataset.test_sha256); otherwise (different data, or --rerun) the test split is run
through the serving engine again. Either way the numbers are the engine's, not torch's.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.core.artifact import CalibrationData, Manifest, load_calibration, load_manifest

DEFAULT_DROPS: tuple[float, ...] = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
DEFAULT_BUDGET_POINTS = 25


@dataclass
class CurvePoint:
    """One threshold vector: chosen on held-out data, evaluated on test data."""

    curve: str
    knob: float | None  # budget (MACs), allowed drop (fraction) or exit number; None for oracle
    heldout_accuracy: float | None
    heldout_macs: float | None
    test_accuracy: float
    test_macs: float
    thresholds: list[float | None] = field(default_factory=list)
    exit_fractions: list[float] = field(default_factory=list)


@dataclass
class ArtifactReport:
    label: str
    name: str
    version: str
    t: float
    cumulative_macs: list[int]
    heldout_samples: int
    test_samples: int
    test_source: str  # "stored" | "engine"
    per_exit_heldout_accuracy: list[float]
    per_exit_test_accuracy: list[float]
    points: list[CurvePoint] = field(default_factory=list)
    precisions: list[str] = field(default_factory=list)  # per stage (service.core.artifact.Precision)

    def curve(self, name: str) -> list[CurvePoint]:
        return [p for p in self.points if p.curve == name]

    @property
    def full_macs(self) -> float:
        return float(self.cumulative_macs[-1])


def _json_thresholds(thresholds: Sequence[float]) -> list[float | None]:
    """+inf -> None (never exit), -inf -> 0.0 (always exit), like ThresholdResult.to_json."""
    return [None if t == math.inf else (0.0 if t == -math.inf else float(t)) for t in thresholds]


def _point(curve: str, knob: float | None, chosen: Any, test: CalibrationData) -> CurvePoint:
    from service.core.policies import evaluate_thresholds

    on_test = evaluate_thresholds(test, chosen.thresholds, curve)
    return CurvePoint(
        curve=curve,
        knob=knob,
        heldout_accuracy=chosen.expected_accuracy,
        heldout_macs=chosen.expected_macs,
        test_accuracy=float(on_test.expected_accuracy or 0.0),
        test_macs=float(on_test.expected_macs or 0.0),
        thresholds=_json_thresholds(chosen.thresholds),
        exit_fractions=[float(f) for f in on_test.exit_fractions or ()],
    )


def oracle_point(test: CalibrationData) -> CurvePoint:
    """Each sample at its first correct exit; samples wrong everywhere go to the last exit."""
    correct = np.asarray(test.correct, dtype=bool)
    num_exits, n = correct.shape
    any_correct = correct.any(axis=0)
    exits = np.where(any_correct, correct.argmax(axis=0), num_exits - 1)
    fractions = np.bincount(exits, minlength=num_exits) / n
    return CurvePoint(
        curve="oracle",
        knob=None,
        heldout_accuracy=None,
        heldout_macs=None,
        test_accuracy=float(any_correct.mean()),
        test_macs=float(np.dot(fractions, np.asarray(test.cumulative_macs, dtype=np.float64))),
        exit_fractions=[float(f) for f in fractions],
    )


def budget_grid(cumulative_macs: Sequence[float], points: int = DEFAULT_BUDGET_POINTS) -> list[float]:
    """Budgets from the first exit's cost to the full network's, evenly spaced (inclusive)."""
    lo, hi = float(cumulative_macs[0]), float(cumulative_macs[-1])
    if hi <= lo:
        return [lo]
    return [float(b) for b in np.linspace(lo, hi, max(2, points))]


def build_artifact_report(
    label: str,
    manifest: Manifest,
    heldout: CalibrationData,
    test: CalibrationData,
    test_source: str,
    *,
    budgets: Sequence[float] | None = None,
    drops: Sequence[float] = DEFAULT_DROPS,
) -> ArtifactReport:
    """Every curve for one artifact (see the module docstring)."""
    from service.core.policies import budget_macs, flat_curve, max_accuracy_drop, max_exit, reference_family

    n_exits = manifest.num_stages
    report = ArtifactReport(
        label=label,
        name=manifest.name,
        version=manifest.version,
        t=manifest.exit_rule.t,
        cumulative_macs=list(manifest.cumulative_macs),
        heldout_samples=heldout.num_samples,
        test_samples=test.num_samples,
        test_source=test_source,
        per_exit_heldout_accuracy=[float(a) for a in np.asarray(heldout.correct).mean(axis=1)],
        per_exit_test_accuracy=[float(a) for a in np.asarray(test.correct).mean(axis=1)],
        precisions=list(manifest.precisions),
    )
    for budget in budgets if budgets is not None else budget_grid(manifest.cumulative_macs):
        report.points.append(_point("reference", budget, budget_macs(heldout, budget, "reference"), test))
        report.points.append(_point("optimal", budget, budget_macs(heldout, budget, "optimal"), test))
    for chosen in flat_curve(reference_family(heldout)):
        report.points.append(_point("reference_family", None, chosen, test))
    for drop in drops:
        report.points.append(_point("accuracy_drop", drop, max_accuracy_drop(heldout, drop), test))
    for k in range(1, n_exits + 1):
        report.points.append(_point("anytime", float(k), max_exit(heldout, k, n_exits), test))
    report.points.append(oracle_point(test))
    return report


# ------------------------------------------------------------------------------------------------
# loading the artifact and its test split
# ------------------------------------------------------------------------------------------------
def load_artifact_splits(
    artifacts_dir: Path,
    data_dir: Path | None,
    *,
    rerun: bool = False,
    batch_size: int = 256,
    threads: int = 1,
) -> tuple[Manifest, CalibrationData, CalibrationData, str]:
    """(manifest, held-out cal, test cal, "stored" | "engine") for one artifact directory."""
    from export.errors import ExportError

    manifest = load_manifest(artifacts_dir, verify=True)
    if manifest.calibration is None:
        raise ExportError(f"{artifacts_dir} has no calibration data: re-export without --no-calibrate")
    heldout = load_calibration(artifacts_dir, manifest, "heldout")
    stored_test: CalibrationData | None
    try:
        stored_test = load_calibration(artifacts_dir, manifest, "test")
    except Exception:
        stored_test = None
    recorded_hash = (manifest.provenance.dataset or {}).get("test_sha256")
    if data_dir is None:
        if stored_test is None:
            raise ExportError(f"{artifacts_dir} stores no test arrays: pass --data to run the test split")
        return manifest, heldout, stored_test, "stored"
    test_set = _test_split(manifest, data_dir)
    if not rerun and stored_test is not None and recorded_hash is not None:
        from export.pipeline import split_sha256

        if split_sha256(test_set, batch_size) == recorded_hash:
            return manifest, heldout, stored_test, "stored"
    return (
        manifest,
        heldout,
        _run_test_split(manifest, artifacts_dir, test_set, batch_size, threads),
        "engine",
    )


def _test_split(manifest: Manifest, data_dir: Path) -> Any:
    """The test split with the artifact's own normalisation and image size."""
    from export.errors import ExportError
    from models.data import load_splits

    dataset = manifest.provenance.dataset or {}
    pre = manifest.preprocessing
    try:
        splits = load_splits(
            data_dir,
            dataset=dataset.get("kind"),
            heldout_size=int(dataset.get("heldout_size", 0)),
            seed=int(dataset.get("split_seed", 0)),
            image_size=pre.height,
            mean=tuple(pre.mean),
            std=tuple(pre.std),
        )
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the test split from {data_dir}: {exc}") from exc
    return splits.test


def _run_test_split(
    manifest: Manifest, artifacts_dir: Path, test_set: Any, batch_size: int, threads: int
) -> CalibrationData:
    from export.calibrate import make_engine, run_split
    from export.pipeline import dataset_batches

    engine = make_engine(manifest, artifacts_dir, threads=threads)
    result, _ = run_split(engine, dataset_batches(test_set, batch_size), manifest.num_stages)
    return CalibrationData(
        confidence=result.confidence,
        correct=result.correct,
        cumulative_macs=np.asarray(manifest.cumulative_macs, dtype=np.float64),
    )


# ------------------------------------------------------------------------------------------------
# writing: CSV, JSON, markdown, PNG
# ------------------------------------------------------------------------------------------------
CSV_FIELDS = (
    "label",
    "curve",
    "knob",
    "heldout_accuracy",
    "heldout_mmacs",
    "test_accuracy",
    "test_mmacs",
    "thresholds",
    "exit_fractions",
)


def write_csv(path: Path, reports: Sequence[ArtifactReport]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for r in reports:
            for p in r.points:
                writer.writerow(
                    [
                        r.label,
                        p.curve,
                        "" if p.knob is None else f"{p.knob:g}",
                        "" if p.heldout_accuracy is None else f"{p.heldout_accuracy:.6f}",
                        "" if p.heldout_macs is None else f"{p.heldout_macs / 1e6:.6f}",
                        f"{p.test_accuracy:.6f}",
                        f"{p.test_macs / 1e6:.6f}",
                        json.dumps(p.thresholds),
                        json.dumps([round(f, 6) for f in p.exit_fractions]),
                    ]
                )


def write_json(path: Path, reports: Sequence[ArtifactReport], extra: dict[str, Any]) -> None:
    body = {**extra, "artifacts": [asdict(r) for r in reports]}
    path.write_text(json.dumps(body, indent=2) + "\n")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _mm(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def write_markdown(path: Path, reports: Sequence[ArtifactReport], plots: Sequence[str]) -> None:
    lines = ["# Accuracy vs compute (test split; thresholds chosen on the held-out split)", ""]
    for r in reports:
        lines += [
            f"## {r.label} — {r.name} (version {r.version}, t = {r.t:g}"
            + (f"; stage precisions {', '.join(r.precisions)}" if r.precisions else "")
            + ")",
            "",
            f"held-out samples: {r.heldout_samples}; test samples: {r.test_samples} (test confidences: "
            + ("stored at export" if r.test_source == "stored" else "run through the engine")
            + ")",
            "",
            "### Per exit (anytime)",
            "",
            "| exit | cumulative MMACs | held-out acc % | test acc % |",
            "|---:|---:|---:|---:|",
        ]
        for k, macs in enumerate(r.cumulative_macs):
            lines.append(
                f"| {k + 1} | {macs / 1e6:.2f} | {_pct(r.per_exit_heldout_accuracy[k])} | "
                f"{_pct(r.per_exit_test_accuracy[k])} |"
            )
        oracle = r.curve("oracle")[0]
        lines += [
            "",
            f"Oracle exit (first correct exit): test accuracy {_pct(oracle.test_accuracy)} % at "
            f"{_mm(oracle.test_macs)} MMACs on average.",
            "",
            "### Budgeted batch (average MMACs per image)",
            "",
            "| budget MMACs | reference held-out acc % | reference test acc % | reference test MMACs | "
            "optimal held-out acc % | optimal test acc % | optimal test MMACs |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        refs = r.curve("reference")
        opts = r.curve("optimal")
        for ref, opt in zip(refs, opts, strict=True):
            lines.append(
                f"| {_mm(ref.knob)} | {_pct(ref.heldout_accuracy)} | {_pct(ref.test_accuracy)} | "
                f"{_mm(ref.test_macs)} | {_pct(opt.heldout_accuracy)} | {_pct(opt.test_accuracy)} | "
                f"{_mm(opt.test_macs)} |"
            )
        lines += [
            "",
            "### Accuracy-drop knob (vs the last exit's held-out accuracy)",
            "",
            "| allowed drop % | held-out acc % | test acc % | test MMACs | MACs saved vs full % |",
            "|---:|---:|---:|---:|---:|",
        ]
        for p in r.curve("accuracy_drop"):
            saved = 100 * (1 - p.test_macs / r.full_macs) if r.full_macs else 0.0
            lines.append(
                f"| {100 * (p.knob or 0):.2f} | {_pct(p.heldout_accuracy)} | {_pct(p.test_accuracy)} | "
                f"{_mm(p.test_macs)} | {saved:.1f} |"
            )
        lines.append("")
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    path.write_text("\n".join(lines))


_POLICY_STYLE: dict[str, dict[str, Any]] = {
    "optimal": {"linestyle": "-", "marker": "o"},
    "reference": {"linestyle": "--", "marker": "s"},
    "accuracy_drop": {"linestyle": ":", "marker": "^"},
    "anytime": {"linestyle": "-.", "marker": "D"},
}
_CURVE_NAMES = {
    "optimal": "budgeted: optimiser",
    "reference": "budgeted: reference (Eq. 9 + family)",
    "accuracy_drop": "accuracy-drop knob",
    "anytime": "anytime (max_exit k)",
}


def _xy(points: Sequence[CurvePoint]) -> tuple[list[float], list[float]]:
    ordered = sorted(points, key=lambda p: p.test_macs)
    return [p.test_macs / 1e6 for p in ordered], [100 * p.test_accuracy for p in ordered]


def plot_artifact(path: Path, r: ArtifactReport) -> None:
    """All curves of one artifact on one accuracy-vs-MMACs plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    family = r.curve("reference_family")
    if family:
        x, y = _xy(family)
        ax.scatter(x, y, s=10, color="0.6", label="reference family (39-point sweep)", zorder=1)
    for curve, style in _POLICY_STYLE.items():
        x, y = _xy(r.curve(curve))
        ax.plot(x, y, label=_CURVE_NAMES[curve], markersize=4, linewidth=1.5, **style)
    oracle = r.curve("oracle")[0]
    ax.scatter(
        [oracle.test_macs / 1e6],
        [100 * oracle.test_accuracy],
        marker="*",
        s=160,
        color="gold",
        edgecolor="black",
        label="oracle exit",
        zorder=5,
    )
    ax.set_xlabel("average MMACs per image (test)")
    ax.set_ylabel("top-1 accuracy on test (%)")
    ax.set_title(f"{r.label}: accuracy vs compute (thresholds from held-out)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_overlay(budgeted_path: Path, anytime_path: Path, reports: Sequence[ArtifactReport]) -> None:
    """The paper's Fig. 4 layout: budgeted-batch curves of all artifacts; anytime per-exit accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    for i, r in enumerate(reports):
        color = colors[i % len(colors)]
        for curve in ("optimal", "reference"):
            x, y = _xy(r.curve(curve))
            ax.plot(
                x,
                y,
                color=color,
                label=f"{r.label} ({_CURVE_NAMES[curve]})",
                markersize=4,
                **_POLICY_STYLE[curve],
            )
    ax.set_xlabel("average MMACs per image (test)")
    ax.set_ylabel("top-1 accuracy on test (%)")
    ax.set_title("Budgeted batch classification")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(budgeted_path)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    for i, r in enumerate(reports):
        x = [m / 1e6 for m in r.cumulative_macs]
        y = [100 * a for a in r.per_exit_test_accuracy]
        ax.plot(x, y, color=colors[i % len(colors)], marker="o", markersize=4, label=r.label)
        for k, (xx, yy) in enumerate(zip(x, y, strict=True)):
            ax.annotate(str(k + 1), (xx, yy), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
    ax.set_xlabel("cumulative MMACs at the exit")
    ax.set_ylabel("top-1 accuracy on test (%)")
    ax.set_title("Anytime prediction: accuracy of each exit")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(anytime_path)
    plt.close(fig)


def write_report(out_dir: Path, reports: Sequence[ArtifactReport], extra: dict[str, Any] | None = None) -> list[Path]:
    """report.md, report.json, curves.csv and the PNGs; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plots: list[str] = []
    if len(reports) > 1:
        plot_overlay(out_dir / "budgeted.png", out_dir / "anytime.png", reports)
        plots += ["budgeted.png", "anytime.png"]
    for r in reports:
        name = f"curves_{_slug(r.label)}.png"
        plot_artifact(out_dir / name, r)
        plots.append(name)
    if len(reports) == 1:
        plot_overlay(out_dir / "budgeted.png", out_dir / "anytime.png", reports)
        plots += ["budgeted.png", "anytime.png"]
    write_csv(out_dir / "curves.csv", reports)
    write_json(out_dir / "report.json", reports, extra or {})
    write_markdown(out_dir / "report.md", reports, plots)
    written += [out_dir / p for p in plots]
    written += [out_dir / "curves.csv", out_dir / "report.json", out_dir / "report.md"]
    return written


def _slug(label: str) -> str:
    import re

    cleaned = re.sub(r"-+", "-", "".join(c if c.isalnum() or c in "-_." else "-" for c in label)).strip("-")
    return cleaned or "model"
