#!/usr/bin/env python
"""Accuracy vs MACs of the threshold policies: reference (BoostNet) vs our optimiser.

    python scripts/policy_curves.py --artifacts ART_DIR --out reports/policies
    python scripts/policy_curves.py --out reports/policies            # synthetic calibration data

Writes `policy_curves.png` and `policy_curves.md` (a table per budget) into --out. Thresholds are
always chosen on the held-out split; when the artifact's calibration file also has a `test_`
split, the same thresholds are evaluated on it too (the honest number: the optimiser searches
more freely on held-out data, so some of its held-out edge is fitting that split).
Without --artifacts it uses `tests.fixtures.synthetic_calibration` (E=10, n=5000, paper MACs):
a stand-in until a trained model exists -- say so wherever you quote its numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.core import policies as P
from service.core.artifact import ArtifactError, CalibrationData, load_calibration, load_manifest
from tests.fixtures.synthetic_calibration import synthetic_calibration


def load(args: argparse.Namespace) -> tuple[str, CalibrationData, CalibrationData | None]:
    if args.artifacts is None:
        cal = synthetic_calibration(args.exits, args.samples, args.seed)
        test = synthetic_calibration(args.exits, args.samples, args.seed + 1000)
        return f"synthetic (E={args.exits}, n={args.samples}, seed={args.seed})", cal, test
    manifest = load_manifest(args.artifacts, verify=True)
    heldout = load_calibration(args.artifacts, manifest, "heldout")
    try:
        test: CalibrationData | None = load_calibration(args.artifacts, manifest, "test")
    except ArtifactError:
        test = None
    return f"{manifest.name} {manifest.version}", heldout, test


def on_split(data: CalibrationData | None, result: P.ThresholdResult) -> P.ThresholdResult | None:
    return None if data is None else P.evaluate_thresholds(data, result.thresholds, result.policy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=None, help="artifact dir (default: synthetic data)")
    parser.add_argument("--out", type=Path, default=Path("reports/policies"))
    parser.add_argument("--exits", type=int, default=10)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", type=int, default=24, help="budgets in the table")
    args = parser.parse_args(argv)

    source, cal, test = load(args)
    macs = np.asarray(cal.cumulative_macs, dtype=np.float64)
    full = float(macs[-1])

    start = time.perf_counter()
    P.budget_macs(cal, float(macs[0]))
    cold_ms = (time.perf_counter() - start) * 1e3
    frontier = P.optimal_frontier(cal)
    family = P.flat_curve(P.reference_family(cal))

    budgets = np.linspace(float(macs[0]), full, args.budgets + 1)[1:]
    rows = []
    for budget in budgets:
        opt = P.budget_macs(cal, float(budget))
        ref = P.budget_macs(cal, float(budget), "reference")
        rows.append((float(budget), ref, opt, on_split(test, ref), on_split(test, opt)))

    args.out.mkdir(parents=True, exist_ok=True)
    write_table(args.out / "policy_curves.md", source, cal, rows, test is not None, cold_ms)
    plot(args.out / "policy_curves.png", source, cal, frontier, family, rows, test is not None)
    print(f"wrote {args.out / 'policy_curves.md'} and {args.out / 'policy_curves.png'}")
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}"


def write_table(
    path: Path,
    source: str,
    cal: CalibrationData,
    rows: list[tuple[float, P.ThresholdResult, P.ThresholdResult, P.ThresholdResult | None, P.ThresholdResult | None]],
    has_test: bool,
    cold_ms: float,
) -> None:
    full = float(cal.cumulative_macs[-1])
    diffs = [(o.expected_accuracy or 0.0) - (r.expected_accuracy or 0.0) for _, r, o, _, _ in rows]
    lines = [
        "# Threshold policies: held-out accuracy vs budget",
        "",
        f"Data: {source}; held-out n = {cal.num_samples}; full network {full / 1e6:.2f} M MACs; "
        f"final-exit held-out accuracy {cal.correct[-1].mean() * 100:.2f} %.",
        f"Optimiser search (cold, this run): {cold_ms:.1f} ms.",
        "",
        "reference = BoostNet (Eq. 9 + the reference sweep, best point within budget); optimal = ours. "
        "Accuracy in %, MACs in millions per image (held-out expected values); the budget is an upper bound.",
        "",
    ]
    header = "| budget (M) | reference acc | reference MACs | optimal acc | optimal MACs | optimal - reference |"
    sep = "|---:|---:|---:|---:|---:|---:|"
    if has_test:
        header += " reference test acc | optimal test acc |"
        sep += "---:|---:|"
    lines += [header, sep]
    for (budget, ref, opt, ref_t, opt_t), diff in zip(rows, diffs, strict=True):
        line = (
            f"| {budget / 1e6:.2f} | {_pct(ref.expected_accuracy)} | {(ref.expected_macs or 0) / 1e6:.2f} | "
            f"{_pct(opt.expected_accuracy)} | {(opt.expected_macs or 0) / 1e6:.2f} | {diff * 100:+.2f} |"
        )
        if has_test:
            line += f" {_pct(ref_t.expected_accuracy if ref_t else None)} |"
            line += f" {_pct(opt_t.expected_accuracy if opt_t else None)} |"
        lines.append(line)
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    lines += [
        "",
        f"optimal - reference (held-out): mean {np.mean(diffs) * 100:+.2f} points, "
        f"best {max(diffs) * 100:+.2f}, "
        f"worst {min(diffs) * 100:+.2f}; better at {wins}, worse at {losses} of {len(diffs)} budgets.",
        "",
    ]
    path.write_text("\n".join(lines))


def plot(
    path: Path,
    source: str,
    cal: CalibrationData,
    frontier: list[P.ThresholdResult],
    family: list[P.ThresholdResult],
    rows: list[tuple[float, P.ThresholdResult, P.ThresholdResult, P.ThresholdResult | None, P.ThresholdResult | None]],
    has_test: bool,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    m = 1e6
    ax.step(
        [(r.expected_macs or 0) / m for r in frontier],
        [(r.expected_accuracy or 0) * 100 for r in frontier],
        where="post",
        label="optimal frontier (held-out)",
        color="C0",
    )
    ax.plot(
        [(r.expected_macs or 0) / m for r in family],
        [(r.expected_accuracy or 0) * 100 for r in family],
        "s",
        ms=3,
        label="reference sweep, flat-curve rule",
        color="C1",
    )
    ax.plot(
        [b / m for b, *_ in rows],
        [(r.expected_accuracy or 0) * 100 for _, r, *_ in rows],
        "--",
        label="reference policy at budget (Eq. 9)",
        color="C1",
    )
    ax.plot(
        [b / m for b, *_ in rows],
        [(o.expected_accuracy or 0) * 100 for _, _, o, *_ in rows],
        "-",
        lw=1,
        alpha=0.6,
        label="optimal policy at budget",
        color="C0",
    )
    if has_test:
        ax.plot(
            [b / m for b, *_ in rows],
            [(t.expected_accuracy or 0) * 100 if t else np.nan for *_, t in rows],
            ":",
            label="optimal thresholds on test split",
            color="C2",
        )
    anytime = cal.correct.mean(axis=1) * 100
    ax.plot(np.asarray(cal.cumulative_macs) / m, anytime, "k.", label="single exits (anytime)")
    ax.set_xlabel("average MACs per image (millions)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Threshold policies -- {source}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
