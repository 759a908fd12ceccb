"""Where the reliability tests write what they measured (one JSON per test).

`build/reliability/<name>.json` (override with BOOSTSERVE_RELIABILITY_OUT). scripts/reliability_report.py
turns these files into the tables of docs/reliability.md, so every figure in the docs comes from a
run, with the run's time, git commit and machine recorded beside it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def results_dir() -> Path:
    path = Path(os.environ.get("BOOSTSERVE_RELIABILITY_OUT", REPO / "build" / "reliability"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _git_sha() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def record(name: str, data: dict[str, Any]) -> Path:
    payload = {
        "name": name,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": _git_sha(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_1_5_15_at_record": [round(x, 2) for x in os.getloadavg()],
        },
        **data,
    }
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path
