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

from service.core.artifact import Manifest, load_manifest

START, END = "<!-- results:start -->", "<!-- results:end -->"
CONFIG_START, CONFIG_END = "<!-- config:start -->", "<!-- config:end -->"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def _stage_ms(engine_json: Path | None) -> dict[tuple[str, int, int], float]:
    """(precision, batch, stage) -> ms per image from a published engine.json (issue 17), else empty."""
    if engine_json is None or not engine_json.is_file():
        return {}
    result = json.loads(engine_json.read_text()).get("result", {})
    return {
        (c.get("precision", "fp32"), c["batch_size"], c["stage"]): c["ms_per_image"]
        for c in result.get("stage_costs", [])
    }


def _equal_cost_line(engine_json: Path | None) -> list[str]:
    """The shipping comparison from a published engine.json: int8 vs fp32 accuracy at equal measured cost."""
    if engine_json is None or not engine_json.is_file():
        return []
    pairs = [q for q in json.loads(engine_json.read_text()).get("result", {}).get("equal_cost", [])]
    gains = [q["other_accuracy"] - q["reference_accuracy"] for q in pairs if q["other_accuracy"] is not None]
    if not gains:
        return []
    return [
        "",
        f"Accuracy at equal measured cost (engine suite, {len(pairs)} fp32 operating points): the int8 artifact is "
        f"as accurate or more at {sum(g >= 0 for g in gains)} of {len(gains)}, by {100 * min(gains):+.2f} to "
        f"{100 * max(gains):+.2f} pp ([docs/benchmarks.md](docs/benchmarks.md), accuracy at equal cost).",
    ]


def int8_block(model: Manifest, int8: Manifest, engine_json: Path | None) -> list[str]:
    """fp32 and int8 side by side: test accuracy per exit and the measured ms per image per stage."""
    fp32_cal, int8_cal = model.calibration, int8.calibration
    ms = _stage_ms(engine_json)
    sizes = [b for b in (1, 32) if any(p == "int8" and n == b for p, n, _ in ms)]  # the decision batch sizes
    lines = [
        "",
        f"int8 version, **served by default** (`service/embedded_model_int8/`, version `{int8.version}`, "
        f"`boostserve quantize`): stage "
        f"precisions {', '.join(int8.precisions)}, chosen by measured time (export/quantize.py)."
        + (f" ms per image per stage from [{engine_json.as_posix()}]({engine_json.as_posix()})." if sizes else ""),
        "",
        "| exit | test accuracy fp32 | test accuracy int8 | stage precision (int8 artifact) |"
        + "".join(f" stage ms/img batch {b}: fp32 → int8 |" for b in sizes),
        "|---:|---:|---:|---|" + "---:|" * len(sizes),
    ]
    for k, stage in enumerate(int8.stages):
        a = fp32_cal.test_accuracy[k] if fp32_cal and fp32_cal.test_accuracy else None
        b = int8_cal.test_accuracy[k] if int8_cal and int8_cal.test_accuracy else None
        cells = "".join(
            f" {ms.get(('fp32', n, k + 1), float('nan')):.3f} → {ms.get(('int8', n, k + 1), float('nan')):.3f} |"
            for n in sizes
        )
        lines.append(f"| {k + 1} | {_pct(a)} | {_pct(b)} | {stage.precision} |{cells}")
    return lines + _equal_cost_line(engine_json)


def results_block(
    model: Manifest,
    baseline: Manifest | None,
    report_dir: Path | None,
    int8: Manifest | None = None,
    engine_json: Path | None = None,
) -> str:
    calibration = model.calibration
    base_cal = baseline.calibration if baseline else None
    full = model.full_macs
    lines = [
        START,
        f"Embedded model `{model.name}` (version `{model.version}`), {model.num_stages} exits, "
        f"t = {model.exit_rule.t}; "
        f"preset `{model.provenance.config.get('name', model.name)}`, "
        f"training seed {model.provenance.seed}, exported at commit `{(model.provenance.git_sha or 'unknown')[:10]}`.",
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
    if int8 is not None:
        lines += int8_block(model, int8, engine_json)
    if report_dir is not None and (report_dir / "report.md").is_file():
        rel = report_dir.as_posix()
        lines += ["", f"Full tables: [{rel}/report.md]({rel}/report.md)."]
        for name in ("budgeted.png", "anytime.png"):
            if (report_dir / name).is_file():
                lines += ["", f"![{name[:-4]}]({rel}/{name})"]
    lines.append(END)
    return "\n".join(lines)


def config_block() -> str:
    """The settings table, straight from the pydantic-settings model (names, defaults, descriptions)."""
    from service.http.settings import Settings

    lines = [CONFIG_START, "| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if name == "artifacts_dir":
            shown = "the embedded model"
        elif default is None or default == []:
            shown = "unset"
        elif isinstance(default, dict):
            shown = "`" + json.dumps(default) + "`"
        else:
            shown = f"`{default}`"
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `BOOSTSERVE_{name.upper()}` | {shown} | {description} |")
    lines.append(CONFIG_END)
    return "\n".join(lines)


def replace_block(text: str, start: str, end: str, block: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"README has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + block + tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("service/embedded_model"))
    parser.add_argument("--baseline", type=Path, default=Path("docs/artifacts/baseline"))
    parser.add_argument("--report", type=Path, default=Path("docs/results"))
    parser.add_argument("--int8", type=Path, default=Path("service/embedded_model_int8"))
    parser.add_argument("--engine", type=Path, default=Path("docs/benchmarks/engine.json"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    args = parser.parse_args()
    model = load_manifest(args.model, verify=False)
    baseline = load_manifest(args.baseline, verify=False) if (args.baseline / "manifest.json").is_file() else None
    report = args.report if args.report.is_dir() else None
    text = args.readme.read_text()
    int8 = load_manifest(args.int8, verify=False) if (args.int8 / "manifest.json").is_file() else None
    block = results_block(model, baseline, report, int8, args.engine if args.engine.is_file() else None)
    updated = replace_block(text, START, END, block)
    updated = replace_block(updated, CONFIG_START, CONFIG_END, config_block())
    if args.check:
        return 0 if updated == text else 1
    args.readme.write_text(updated)
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
