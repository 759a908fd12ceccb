"""Shared plumbing: artifact loading, thresholds for the engine/HTTP suites, progress, JSON I/O."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.stats import jsonable

if TYPE_CHECKING:
    from service.core.artifact import CalibrationData, Manifest

#: Accuracy-drop budgets the HTTP suite serves and every report highlights (the issue's targets).
HEADLINE_DROPS: tuple[float, ...] = (0.005, 0.01)
#: The budget the targets are stated at: "≤ 1 % served-accuracy loss".
TARGET_DROP = 0.01


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact directory: manifest + both calibration splits (test may be missing)."""

    path: Path
    manifest: Manifest
    heldout: CalibrationData | None
    test: CalibrationData | None

    @property
    def cumulative_macs(self) -> np.ndarray:
        return np.asarray(self.manifest.cumulative_macs, dtype=np.float64)

    @property
    def full_macs(self) -> float:
        return float(self.manifest.full_macs)


def load_artifact(path: Path) -> Artifact:
    """Load and sha256-verify an artifact; the calibration splits are optional (None if absent)."""
    from service.core.artifact import ArtifactError, load_calibration, load_manifest

    manifest = load_manifest(path, verify=True)
    splits: dict[str, CalibrationData | None] = {}
    for split in ("heldout", "test"):
        try:
            splits[split] = load_calibration(path, manifest, split=split)
        except ArtifactError:
            splits[split] = None
    return Artifact(path, manifest, splits["heldout"], splits["test"])


def thresholds_for_drop(artifact: Artifact, drop: float) -> list[float]:
    """Per-exit thresholds of the accuracy-drop knob, chosen on the held-out split (service.core.policies)."""
    from service.core import policies as policy

    if artifact.heldout is None:
        raise ValueError(f"{artifact.path} has no calibration data: cannot pick thresholds for a drop budget")
    return [float(t) for t in policy.max_accuracy_drop(artifact.heldout, drop).thresholds]


def all_stages_thresholds(num_exits: int) -> list[float]:
    """Never exit before the last stage (+inf everywhere, -inf last): the 'all stages' reference."""
    return [math.inf] * (num_exits - 1) + [-math.inf]


def simulate_exits(
    confidence: np.ndarray, correct: np.ndarray, thresholds: list[float], cumulative_macs: np.ndarray
) -> dict[str, Any]:
    """Independent re-implementation of the exit rule on calibration arrays.

    Why a second implementation next to `service.core.policies.evaluate_thresholds`: the offline suite
    cross-checks the two and records any disagreement, so a policy bug cannot silently produce a
    flattering curve.
    """
    num_exits, n = confidence.shape
    exits = np.full(n, num_exits - 1, dtype=np.int64)
    open_ = np.ones(n, dtype=bool)
    t32 = np.asarray(thresholds, dtype=np.float32)  # the engine compares in float32 too
    for k in range(num_exits - 1):
        take = open_ & (confidence[k] >= t32[k])
        exits[take] = k
        open_ &= ~take
    hits = correct[exits, np.arange(n)]
    return {
        "accuracy": float(hits.mean()),
        "macs": float(cumulative_macs[exits].mean()),
        "exit_fractions": (np.bincount(exits, minlength=num_exits) / n).tolist(),
    }


def json_number(value: Any) -> float:
    """JSON value -> float; None (a NaN in the results) and strings become NaN."""
    return float(value) if isinstance(value, int | float) else math.nan


def format_number(value: Any, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """Format a number from the results JSON for a report ("–" for missing/NaN; "inf"/"-inf"
    strings pass through): the one rule every suite's markdown uses."""
    if value in ("inf", "-inf"):
        return str(value)
    number = json_number(value)
    if math.isnan(number):
        return "–"
    return fmt.format(number * scale)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Strict JSON (no NaN/Infinity tokens), sorted for stable diffs of committed results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


class Progress:
    """Progress lines for long runs: a rich progress bar when rich is installed, else plain lines.

    Why optional: rich is not a serving dependency; the bench must still work without it.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._console: Any = None
        if enabled:
            try:
                from rich.console import Console

                self._console = Console(stderr=True)
            except ImportError:
                self._console = None

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%H:%M:%S")
        if self._console is not None:
            self._console.print(f"[dim]{stamp}[/dim] {message}", highlight=False)
        else:
            print(f"{stamp} {message}", file=sys.stderr, flush=True)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Any]:
        """Yield an `advance(n=1, note="")` callable over a bar of `total` steps."""
        if not self.enabled:
            yield lambda n=1, note="": None
            return
        if self._console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[note]}"),
                console=self._console,
                transient=False,
            ) as bar:
                task_id = bar.add_task(description, total=total, note="")

                def advance(n: int = 1, note: str = "") -> None:
                    bar.update(task_id, advance=n, note=note)

                yield advance
            return
        done = [0]

        def advance_plain(n: int = 1, note: str = "") -> None:
            done[0] += n
            self.log(f"{description}: {done[0]}/{total} {note}")

        yield advance_plain
