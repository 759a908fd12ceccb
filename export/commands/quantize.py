"""`boostserve quantize`: an fp32 artifact -> a new artifact with int8 stages where they are faster.

Static QDQ quantization calibrated on training images, per-stage precision chosen by timing both
versions on this machine, calibration arrays recomputed through the quantized engine, parity with
fp32 checked (export/quantize.py). Top-level imports stay light: onnxruntime loads inside `run`.
Exit status: 0 on success, 1 when a check fails (nothing is written at --out).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _stage_precisions(text: str) -> tuple[str, ...] | None:
    if text == "auto":
        return None
    from export.quantize_rule import parse_precisions

    try:
        return parse_precisions(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_quantize_options(parser: argparse.ArgumentParser | Any) -> None:
    """The options `boostserve quantize` and `boostserve export --precision int8` share."""
    from export.quantize_rule import (
        DECISION_BATCH_SIZES,
        DEFAULT_CALIBRATION_IMAGES,
        DEFAULT_MARGIN,
        DEFAULT_MIN_AGREEMENT,
    )

    parser.add_argument(
        "--calibration-images",
        type=int,
        default=DEFAULT_CALIBRATION_IMAGES,
        help="training images the int8 activation ranges are calibrated on (never held-out or test)",
    )
    parser.add_argument("--calibration-seed", type=int, default=0, help="seed of the training-image draw")
    parser.add_argument(
        "--stage-precision",
        type=_stage_precisions,
        default=None,
        metavar="auto|P1,P2,...",
        help="per-stage precision (fp32/int8 each); default auto: int8 where measured faster",
    )
    parser.add_argument(
        "--decision-batch-sizes",
        type=_batch_sizes,
        default=DECISION_BATCH_SIZES,
        help="batch sizes int8 must be faster at (every one) for a stage to switch",
    )
    parser.add_argument(
        "--margin", type=float, default=DEFAULT_MARGIN, help="how much faster int8 must be (fraction of fp32 time)"
    )
    parser.add_argument(
        "--timing-rounds", type=int, default=5, help="interleaved fp32/int8 timing rounds per stage and batch size"
    )
    parser.add_argument(
        "--timing-round-seconds", type=float, default=0.2, help="seconds per precision per timing round"
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=DEFAULT_MIN_AGREEMENT,
        help="minimum share of images whose int8 label equals fp32's, at every exit",
    )


def quantize_options(args: argparse.Namespace, *, threads: int, overwrite: bool, progress: bool) -> Any:
    from export.quantize import QuantizeOptions

    return QuantizeOptions(
        calibration_images=args.calibration_images,
        seed=args.calibration_seed,
        decision_batch_sizes=args.decision_batch_sizes,
        margin=args.margin,
        rounds=max(1, args.timing_rounds),
        round_seconds=max(0.0, args.timing_round_seconds),
        precisions=args.stage_precision,
        min_agreement=args.min_agreement,
        threads=threads,
        overwrite=overwrite,
        progress=progress,
    )


def print_result(result: Any) -> None:
    """The per-stage choice, its timings and the parity with fp32, as the export report prints it."""
    manifest = result.manifest
    print(f"wrote {result.path} (model {manifest.name}, version {manifest.version})")
    print(f"stage precision: {', '.join(result.precisions)}  ({result.rule})")
    for t in result.timings:
        print(
            f"  stage {t.stage + 1} batch {t.batch_size:>3}: fp32 {t.fp32_ms:.4f} ms/img, int8 {t.int8_ms:.4f} "
            f"ms/img ({t.speedup:.2f}x)"
        )
    print("parity vs fp32 (held-out + test images): label agreement, max / mean |logits diff|")
    for k, p in enumerate(result.parity):
        print(
            f"  exit {k + 1}: {p.agreement:.4%} of {p.images}, max {p.max_abs_logits:.3g}, mean {p.mean_abs_logits:.3g}"
        )
    cal = manifest.calibration
    if cal is not None and cal.test_accuracy is not None and result.fp32_test_accuracy is not None:
        print("test accuracy per exit (fp32 -> served):")
        for k, (a, b) in enumerate(zip(result.fp32_test_accuracy, cal.test_accuracy, strict=True)):
            print(f"  exit {k + 1}: {a:.4f} -> {b:.4f}")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--artifacts", required=True, metavar="DIR", help="fp32 artifact directory to quantize")
    parser.add_argument("--out", default=None, help="artifact directory to create (default: DIR_int8, beside DIR)")
    parser.add_argument(
        "--data", default=None, help="dataset directory (default: the one the artifact's provenance records)"
    )
    add_quantize_options(parser)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (as served: 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from export.errors import ExportError
    from export.quantize import quantize_artifact
    from service.core.artifact import ArtifactError

    source = Path(args.artifacts)
    out = Path(args.out) if args.out else source.with_name(f"{source.name}_int8")
    options = quantize_options(args, threads=max(1, args.threads), overwrite=args.overwrite, progress=not args.quiet)
    try:
        result = quantize_artifact(source, out, args.data, options)
    except (ExportError, ArtifactError) as exc:
        print(f"quantize failed: {exc}\nnothing was written to {out}", file=sys.stderr)
        return 1
    print_result(result)
    return 0
