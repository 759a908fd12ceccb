"""`boostserve report`: accuracy-vs-MACs curves, tables and plots on the test split.

Thresholds are chosen on each artifact's held-out calibration data and evaluated on the test
split (see export/report.py). Give two artifacts (a BoostNet and its t=0 baseline) to overlay
them like the paper's Fig. 4. Top-level imports stay light: numpy/matplotlib load inside `run`.
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument(
        "--artifacts", action="append", required=True, metavar="DIR", help="artifact directory (repeatable)"
    )
    parser.add_argument(
        "--data",
        default=None,
        help="dataset directory; its test split is hashed and, if it differs from the one stored at "
        "export, re-run through the engine (default: use the stored test arrays)",
    )
    parser.add_argument("--out", required=True, help="output directory for report.md/json, CSV and PNGs")
    parser.add_argument("--label", action="append", default=None, metavar="NAME", help="label per artifact")
    parser.add_argument("--rerun", action="store_true", help="always run the test split through the engine")
    parser.add_argument("--budgets", type=int, default=25, help="number of budgets on the grid")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads when re-running")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from export.errors import ExportError
    from export.report import (
        ArtifactReport,
        budget_grid,
        build_artifact_report,
        load_artifact_splits,
        write_report,
    )
    from service.core.artifact import ArtifactError

    labels: list[str] = list(args.label or [])
    if labels and len(labels) != len(args.artifacts):
        print("report: give one --label per --artifacts (or none)", file=sys.stderr)
        return 2
    reports: list[ArtifactReport] = []
    try:
        for i, directory in enumerate(args.artifacts):
            manifest, heldout, test, source = load_artifact_splits(
                Path(directory),
                Path(args.data) if args.data else None,
                rerun=args.rerun,
                batch_size=args.batch_size,
                threads=max(1, args.threads),
            )
            label = labels[i] if labels else manifest.name
            if label in {r.label for r in reports}:
                label = f"{label}-{i + 1}"
            how = "reused from the export" if source == "stored" else "run through the engine"
            print(f"{label}: test split {how}")
            reports.append(
                build_artifact_report(
                    label,
                    manifest,
                    heldout,
                    test,
                    source,
                    budgets=budget_grid(manifest.cumulative_macs, args.budgets),
                )
            )
    except (ExportError, ArtifactError) as exc:
        print(f"report failed: {exc}", file=sys.stderr)
        return 1
    extra = {"artifacts_dirs": [str(Path(a).resolve()) for a in args.artifacts], "data": args.data}
    written = write_report(Path(args.out), reports, extra)
    for path in written:
        print(f"wrote {path}")
    return 0
