"""`boostserve export`: checkpoint -> per-stage ONNX graphs + manifest.json + calibration.npz.

Top-level imports stay light (argparse only): torch, onnx and onnxruntime load inside `run`.
Exit status: 0 on success; 1 when the export fails a check (graph check, parity, calibration) —
in that case nothing is written at --out (the work happens in a temporary directory).
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by `boostserve train`")
    parser.add_argument("--data", required=True, help="dataset directory (held-out split for calibration)")
    parser.add_argument("--out", required=True, help="artifact directory to create")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset to pin")
    parser.add_argument("--name", default=None, help="model name in the manifest (default: config name)")
    parser.add_argument(
        "--heldout-size", type=int, default=None, help="override the checkpoint's held-out size (warns)"
    )
    parser.add_argument("--seed", type=int, default=None, help="override the checkpoint's split seed (warns)")
    parser.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="skip calibration (only explicit thresholds / max_exit budgets will work)",
    )
    parser.add_argument("--no-test", dest="include_test", action="store_false", help="do not store test-split arrays")
    parser.add_argument("--batch-size", type=int, default=256, help="calibration batch size")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="parity tolerance (max abs, logits)")
    parser.add_argument(
        "--exporter", choices=("torchscript", "dynamo"), default="torchscript", help="torch.onnx exporter"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import torch

    from export.errors import ExportError
    from export.pipeline import ExportOptions
    from export.source import export_from_checkpoint

    torch.set_num_threads(max(1, args.threads))
    options = ExportOptions(
        opset=args.opset,
        exporter=args.exporter,
        tolerance=args.tolerance,
        batch_size=args.batch_size,
        calibrate=args.calibrate,
        include_test=args.include_test,
        overwrite=args.overwrite,
        progress=not args.quiet,
        threads=max(1, args.threads),
    )
    try:
        result = export_from_checkpoint(
            args.checkpoint,
            args.data,
            args.out,
            options,
            name=args.name,
            heldout_size=args.heldout_size,
            seed=args.seed,
        )
    except ExportError as exc:
        print(f"export failed: {exc}\nnothing was written to {args.out}", file=sys.stderr)
        return 1
    manifest = result.manifest
    print(f"wrote {result.path} (model {manifest.name}, version {manifest.version})")
    print(f"parity max abs (logits): {result.parity.worst:.2e}")
    if manifest.calibration is not None:
        accs = " ".join(f"{a:.4f}" for a in manifest.calibration.heldout_accuracy)
        print(f"held-out accuracy per exit: {accs}")
        if manifest.calibration.test_accuracy is not None:
            test = " ".join(f"{a:.4f}" for a in manifest.calibration.test_accuracy)
            print(f"test accuracy per exit:     {test}")
    macs = " ".join(f"{m / 1e6:.2f}" for m in manifest.cumulative_macs)
    print(f"cumulative MMACs per exit:  {macs}")
    return 0
