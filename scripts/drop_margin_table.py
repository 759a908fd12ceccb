#!/usr/bin/env python
"""The max_accuracy_drop confidence margin, measured: plain rule vs 90 % vs 95 % bound.

    python scripts/drop_margin_table.py [--write docs/policies.md] ARTIFACT_DIR...

Thresholds are chosen on each artifact's held-out split and evaluated on its `test_` split.
Prints the markdown table; with --write, puts it between the `drop-margin-table` markers of that
file (scripts/make_embedded_model.sh does, so the table follows the shipped model).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.core import policies as P
from service.core.artifact import load_calibration, load_manifest

LEVELS = (0.5, 0.9, P.DROP_CONFIDENCE)
DROPS = (0.005, 0.01)


def rows(artifact: str) -> list[str]:
    manifest = load_manifest(artifact)
    heldout = load_calibration(artifact, manifest)
    test = load_calibration(artifact, manifest, split="test")
    full = float(test.correct[-1].mean())
    out = []
    for drop in DROPS:
        cells = []
        for level in LEVELS:
            chosen = P.max_accuracy_drop(heldout, drop, confidence=level)
            served = P.evaluate_thresholds(test, chosen.thresholds)
            assert served.expected_accuracy is not None and served.expected_macs is not None
            loss = 100 * (full - served.expected_accuracy)
            cells.append(f"{loss:.2f} pp / {served.expected_macs / 1e6:.2f} M")
        out.append(f"| `{manifest.name}` | {100 * drop:g} % | " + " | ".join(cells) + " |")
    return out


START, END = "<!-- drop-margin-table -->", "<!-- /drop-margin-table -->"


def main(argv: list[str]) -> int:
    target = None
    if argv[:1] == ["--write"]:
        target, argv = Path(argv[1]), argv[2:]
    lines = [
        "| model | knob | plain rule: test loss / MACs | 90 % bound | 95 % bound (served) |",
        "|---|---|---|---|---|",
    ]
    for artifact in argv or ["service/embedded_model"]:
        lines += rows(artifact)
    table = "\n".join(lines)
    print(table)
    if target is not None:
        text = target.read_text()
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        if not rest:
            raise SystemExit(f"{target}: no {START} marker")
        target.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
