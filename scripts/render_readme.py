"""Regenerate the measured-results block of README.md from the shipped artifacts.

The numbers in the README are never typed by hand: this script reads the embedded model's
manifest (per-exit test accuracy, cumulative MACs) and, when present, the baseline artifact and the
`boostserve report` output, and rewrites the text between the markers
`<!-- results:start -->` and `<!-- results:end -->`. `make model` runs it; a test checks that the
README is up to date with the shipped manifest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.manifest import Manifest, load_manifest

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def results_block(model: Manifest, baseline: Manifest | None, report_dir: Path | None) -> str:
    calibration = model.calibration
    base_cal = baseline.calibration if baseline else None
    full = model.full_macs
    lines = [
        START,
        f"Embedded model `{model.name}` (version `{model.version}`), {model.num_stages} exits, "
        f"t = {model.exit_rule.t}; "
        f"trained with `{json.dumps(model.provenance.config.get('name', model.name))}` "
        f"seed {model.provenance.seed}, commit `{(model.provenance.git_sha or 'unknown')[:10]}`.",
        "",
        f"| exit | cumulative MACs | % of full | test accuracy (BoostNet, t={model.exit_rule.t}) "
        "| test accuracy (baseline, t=0) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for k, stage in enumerate(model.stages):
        acc = calibration.test_accuracy[k] if calibration and calibration.test_accuracy else None
        base = base_cal.test_accuracy[k] if base_cal and base_cal.test_accuracy else None
        lines.append(
            f"| {k + 1} | {stage.cumulative_macs / 1e6:.3f} M | {100 * stage.cumulative_macs / full:.1f} % "
            f"| {_pct(acc)} | {_pct(base)} |"
        )
    if report_dir is not None and (report_dir / "report.md").is_file():
        rel = report_dir.as_posix()
        lines += ["", f"Full tables: [{rel}/report.md]({rel}/report.md)."]
        for png in sorted(report_dir.glob("*.png")):
            lines += ["", f"![{png.stem}]({rel}/{png.name})"]
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("service/embedded_model"))
    parser.add_argument("--baseline", type=Path, default=Path("docs/artifacts/baseline"))
    parser.add_argument("--report", type=Path, default=Path("docs/results"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    args = parser.parse_args()
    model = load_manifest(args.model, verify=False)
    baseline = load_manifest(args.baseline, verify=False) if (args.baseline / "manifest.json").is_file() else None
    report = args.report if args.report.is_dir() else None
    text = args.readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    updated = head + results_block(model, baseline, report) + tail
    if args.check:
        return 0 if updated == text else 1
    args.readme.write_text(updated)
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
