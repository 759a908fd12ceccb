"""The per-stage precision rule of export.quantize, and its vocabulary: pure Python, no numpy.

Why apart from export.quantize: the CLI builds its options from these names without importing
torch or onnxruntime (the dispatcher's rule), and the rule is unit-tested on fake timings.
See export/quantize.py for why the rule is what it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from service.core.artifact import DEFAULT_PRECISION, Precision

#: Batch sizes the per-stage choice is measured at: idle (1) and loaded (about 32 per stage batch).
DECISION_BATCH_SIZES: Final = (1, 32)
#: int8 must be this much faster at every decision batch size (see export/quantize.py).
DEFAULT_MARGIN: Final = 0.05
#: Training images the activation ranges are calibrated on.
DEFAULT_CALIBRATION_IMAGES: Final = 512
#: Below this label agreement with fp32 at any exit, the int8 graphs are refused.
DEFAULT_MIN_AGREEMENT: Final = 0.97


@dataclass(frozen=True)
class StageTiming:
    """Median (and range) ms per image of one stage at one batch size, both precisions."""

    stage: int  # 0-based
    batch_size: int
    fp32_ms: float
    int8_ms: float
    fp32_range: tuple[float, float] = (0.0, 0.0)
    int8_range: tuple[float, float] = (0.0, 0.0)

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms if self.int8_ms > 0 else float("inf")


def choose_precisions(
    timings: Sequence[StageTiming], num_stages: int, batch_sizes: Sequence[int], margin: float = DEFAULT_MARGIN
) -> list[Precision]:
    """int8 for a stage iff int8_ms <= (1 - margin) * fp32_ms at every batch size in `batch_sizes`.

    A stage missing a timing at one of the batch sizes stays fp32 (no measurement, no switch).
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    by_key = {(t.stage, t.batch_size): t for t in timings}
    chosen: list[Precision] = []
    for stage in range(num_stages):
        cells = [by_key.get((stage, b)) for b in batch_sizes]
        faster = bool(cells) and all(c is not None and c.int8_ms <= (1.0 - margin) * c.fp32_ms for c in cells)
        chosen.append("int8" if faster else DEFAULT_PRECISION)
    return chosen


def parse_precisions(text: str, num_stages: int | None = None) -> tuple[Precision, ...]:
    """'fp32,int8,int8,int8' -> a per-stage tuple; strict (unknown names and wrong counts are errors)."""
    names = [t.strip() for t in text.split(",")]
    out: list[Precision] = []
    for name in names:
        if name == "fp32":
            out.append("fp32")
        elif name == "int8":
            out.append("int8")
        else:
            raise ValueError(f"unknown precision {name!r} in {text!r}: use fp32 or int8 per stage")
    if num_stages is not None and len(out) != num_stages:
        raise ValueError(f"{len(out)} precisions for {num_stages} stages in {text!r}")
    return tuple(out)
