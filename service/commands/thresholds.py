"""`boostserve thresholds`: turn a compute budget into per-exit thresholds, offline.

Loads the artifact (manifest hashes verified) and its held-out calibration data, resolves one
budget exactly like the service does (`service.core.budget.BudgetResolver`) and prints the thresholds,
the expected held-out accuracy and MACs, and how many images leave at each exit.

Budget forms:
  --budget-macs 30M | 30e6 | 1.5e7 | 500k | 1.2G   average MACs per image (k = 1e3, M = 1e6, G = 1e9)
  --max-accuracy-drop 0.01 | 1%                     fraction (0.01 = one percentage point) or percent
  --max-exit 3                                      anytime mode, 1-based exit
  --thresholds 0.9,0.8,never,0                      one per exit; never/none/null/inf = never exit there

Exit status: 0 on success, 2 on a bad budget or artifact (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import Any

from service.core.errors import ValidationFailedError
from service.core.knobs import BUDGET_FIELD_KNOBS, BUDGET_KNOBS, KNOB_BY_NAME, Knob

_SUFFIXES = {"": 1.0, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9}


def parse_macs(text: str) -> float:
    """'30M' -> 3e7, '1.5e7' -> 1.5e7, '500k' -> 5e5, '1.2G' -> 1.2e9 (optional trailing 'MACs')."""
    cleaned = text.strip().replace("_", "").replace(",", "")
    cleaned = re.sub(r"(?i)\s*macs?$", "", cleaned)
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgG]?)", cleaned)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a MAC count: {text!r} (examples: 30M, 3e7, 1.5e7, 500k)")
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def parse_drop(text: str) -> float:
    """'0.01' -> 0.01, '1%' -> 0.01."""
    cleaned = text.strip()
    try:
        if cleaned.endswith("%"):
            return float(cleaned[:-1]) / 100.0
        return float(cleaned)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an accuracy drop: {text!r} (examples: 0.01, 1%)") from None


#: CLI conveniences on top of the table's text form: MAC suffixes and percentages.
_CLI_FORMS: dict[str, tuple[Any, str, str]] = {
    "budget_macs": (parse_macs, "MACS", "30M, 3e7, 500k, 1.2G"),
    "max_accuracy_drop": (parse_drop, "DROP", "0.01 or 1%%"),
    "drop_confidence": (None, "P", "0.95"),
    "max_exit": (None, "K", "3"),
    "thresholds": (None, "T1,T2,...", "0.9,0.8,never,0"),
}


def _knob_type(knob: Knob) -> Any:
    """argparse type: the CLI form (if any), then the knob's own parse (range, spelling)."""
    pre = _CLI_FORMS.get(knob.name, (None, "", ""))[0]

    def convert(text: str) -> Any:
        try:
            return knob.parse(pre(text) if pre is not None else text)
        except ValidationFailedError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    convert.__name__ = knob.name  # argparse names the type in its messages
    return convert


#: Budget refiners other than --policy (its choices are a flag of their own): from the knob table.
_REFINERS: tuple[Knob, ...] = tuple(k for k in BUDGET_FIELD_KNOBS if k.role == "policy" and k.name != "policy")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  boostserve thresholds --artifacts ART --budget-macs 30M\n"
        "  boostserve thresholds --artifacts ART --budget-macs 1.5e7 --policy reference --json\n"
        "  boostserve thresholds --artifacts ART --max-accuracy-drop 1% --drop-confidence 0.9\n"
        "  boostserve thresholds --artifacts ART --max-accuracy-drop 1%\n"
        "  boostserve thresholds --artifacts ART --max-exit 3\n"
        "  boostserve thresholds --artifacts ART --thresholds 0.9,0.8,never,0\n"
        "see docs/policies.md for what each knob and policy does"
    )
    parser.add_argument("--artifacts", required=True, metavar="ART_DIR", help="artifact directory (manifest.json)")
    group = parser.add_mutually_exclusive_group(required=True)
    for knob in BUDGET_KNOBS:
        _, metavar, examples = _CLI_FORMS.get(knob.name, (None, knob.name.upper(), str(knob.example)))
        group.add_argument(
            f"--{knob.name.replace('_', '-')}",
            type=_knob_type(knob),
            metavar=metavar,
            help=f"{knob.description.replace('%', '%%')} (e.g. {examples})",
        )
    policy = KNOB_BY_NAME["policy"]
    defaults = ", ".join(f"{k.name}: {k.default_policy}" for k in BUDGET_KNOBS if k.takes_policy)
    parser.add_argument("--policy", choices=policy.choices, help=f"{policy.description} (defaults: {defaults})")
    for knob in _REFINERS:
        _, metavar, examples = _CLI_FORMS.get(knob.name, (None, knob.name.upper(), str(knob.example)))
        parser.add_argument(
            f"--{knob.name.replace('_', '-')}",
            type=_knob_type(knob),
            metavar=metavar,
            help=f"{knob.description.replace('%', '%%')} (e.g. {examples})",
        )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")


def _budget_fields(args: argparse.Namespace) -> dict[str, Any]:
    names = [k.name for k in BUDGET_FIELD_KNOBS]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def run(args: argparse.Namespace) -> int:
    from service.core.artifact import ArtifactError, load_calibration, load_manifest
    from service.core.budget import BudgetResolver
    from service.core.errors import BoostServeError
    from service.core.knobs import Budget, format_macs

    try:
        manifest = load_manifest(args.artifacts, verify=True)
        calibration = load_calibration(args.artifacts, manifest) if manifest.calibration is not None else None
        budget = Budget.parse(_budget_fields(args))
        result = BudgetResolver(manifest, calibration).resolve(budget)
    except (ArtifactError, BoostServeError, ValueError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        print(f"boostserve thresholds: error: {message}", file=sys.stderr)
        return 2

    full = float(manifest.full_macs)
    if args.json:
        body = result.to_json()
        body.update(
            {
                "budget": budget.to_json(),
                "budget_description": budget.describe(),
                "expected_macs_fraction": None
                if result.expected_macs is None
                else round(result.expected_macs / full, 6),
                "full_macs": full,
                "cumulative_macs": [float(m) for m in manifest.cumulative_macs],
                "num_exits": manifest.num_stages,
                "model": {"name": manifest.name, "version": manifest.version},
                "calibration_samples": None if calibration is None else calibration.num_samples,
            }
        )
        print(json.dumps(body, sort_keys=False))
        return 0

    print(f"model      {manifest.name} (version {manifest.version}, {manifest.num_stages} exits)")
    print(f"budget     {budget.describe()}  ->  policy {result.policy}")
    if result.expected_accuracy is not None and result.expected_macs is not None and calibration is not None:
        print(f"expected   accuracy {result.expected_accuracy * 100:.2f}% (held-out, n={calibration.num_samples})")
        print(
            f"           MACs {format_macs(result.expected_macs)} per image "
            f"({result.expected_macs / full * 100:.1f}% of the full network, {format_macs(full)})"
        )
        final = float(calibration.correct[-1].mean())
        print(f"           final exit alone: accuracy {final * 100:.2f}%, MACs {format_macs(full)}")
    else:
        print("expected   (no calibration data: expected accuracy and MACs unknown)")
    print()
    header = f"{'exit':>4}  {'threshold':>10}  {'cum. MACs':>10}  {'exiting':>8}  {'exit acc.':>9}"
    print(header)
    print("-" * len(header))
    exit_accuracy = None if calibration is None else calibration.correct.mean(axis=1)
    for k, threshold in enumerate(result.thresholds):
        if threshold == math.inf:
            shown = "never"
        elif threshold == -math.inf:
            shown = "always"
        else:
            shown = f"{threshold:.6f}"
        fraction = "-" if result.exit_fractions is None else f"{result.exit_fractions[k] * 100:.1f}%"
        accuracy = "-" if exit_accuracy is None else f"{exit_accuracy[k] * 100:.1f}%"
        macs = format_macs(float(manifest.cumulative_macs[k]))
        print(f"{k + 1:>4}  {shown:>10}  {macs:>10}  {fraction:>8}  {accuracy:>9}")
    print()
    print("threshold: exit when max softmax >= it; never/always: +inf/-inf; exiting: share of held-out images")
    print("exit acc.: that exit's own held-out accuracy on all images (anytime)")
    return 0
