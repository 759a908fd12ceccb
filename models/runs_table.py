"""Markdown comparison of training runs, generated from their results.json / history.json.

    python -m models.runs_table runs/compact-fmnist-t05 runs/compact-fmnist-t0

Used to write docs/training.md so the numbers there are never hand-typed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _load(run: Path) -> dict[str, Any]:
    results = json.loads((run / "results.json").read_text())
    results["history"] = json.loads((run / "history.json").read_text())
    results["run"] = str(run)
    return results


def table(runs: list[Path]) -> str:
    data = [_load(r) for r in runs]
    full = data[0]["exits"][-1]["cumulative_macs"]
    names = [f"t={d['boosting']['t']:g} (`{Path(d['run']).name}`)" for d in data]
    lines = [
        "| exit | cumulative MMACs | % of full | " + " | ".join(f"test acc % {n}" for n in names) + " |",
        "|---:|---:|---:|" + "---:|" * len(data),
    ]
    for k, e in enumerate(data[0]["exits"]):
        accs = [d["exits"][k]["test_acc"] for d in data]
        best = max(accs)
        cells = [f"**{a:.2f}**" if a == best and len(data) > 1 else f"{a:.2f}" for a in accs]
        lines.append(
            f"| {e['exit']} | {e['cumulative_macs'] / 1e6:.2f} | {100 * e['cumulative_macs'] / full:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append("")
    lines.append("| run | epochs | training time | final held-out acc per exit % |")
    lines.append("|---|---:|---:|---|")
    for n, d in zip(names, data, strict=True):
        val = " / ".join(f"{a:.2f}" for a in d["val_acc"])
        lines.append(f"| {n} | {d['epochs']} | {d['train_seconds'] / 60:.1f} min | {val} |")
    if len(data) == 2:
        wins = sum(a["test_acc"] > b["test_acc"] for a, b in zip(data[0]["exits"], data[1]["exits"], strict=True))
        lines.append("")
        lines.append(f"{names[0]} is better than {names[1]} at {wins} of {len(data[0]['exits'])} exits.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(table([Path(a) for a in args]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
