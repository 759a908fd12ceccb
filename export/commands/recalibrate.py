"""`boostserve recalibrate`: rewrite an artifact's calibration.npz through the serving engine.

No retraining and no re-export: the stage graphs stay, the held-out/test splits are reproduced
from the manifest's provenance, and only confidences computed by an older rule change (see
export/recalibrate.py). Exit status: 0 on success (also when nothing had to change), 1 when the
data or the engine do not reproduce the artifact's splits and correctness (nothing is written).
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("artifacts", metavar="ARTIFACT_DIR", help="artifact directory (manifest.json, calibration.npz)")
    parser.add_argument("--data", required=True, help="dataset directory the artifact was calibrated on")
    parser.add_argument("--check", action="store_true", help="only report what would change; write nothing")
    parser.add_argument("--batch-size", type=int, default=256, help="engine batch size")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")


def run(args: argparse.Namespace) -> int:
    from export.errors import ExportError
    from export.recalibrate import recalibrate
    from service.core.artifact import ArtifactError

    try:
        result = recalibrate(
            args.artifacts, args.data, batch_size=args.batch_size, threads=max(1, args.threads), write=not args.check
        )
    except (ExportError, ArtifactError) as exc:
        print(f"recalibrate failed: {exc}\nnothing was written to {args.artifacts}", file=sys.stderr)
        return 1
    for change in result.changes:
        print(
            f"{change.split}: {change.changed} of {change.confidences} confidences differ from the serving rule "
            f"(max |change| {change.max_abs_change:.3g}); labels and correctness unchanged"
        )
    if result.written:
        print(f"wrote {args.artifacts}: version {result.previous_version} -> {result.manifest.version}")
    elif any(c.changed for c in result.changes):
        print(f"--check: {args.artifacts} would change (version {result.previous_version} stays until written)")
    else:
        print(f"{args.artifacts} is already calibrated with the serving rule (version {result.manifest.version})")
    return 0
