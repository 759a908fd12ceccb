"""`boostserve export`: checkpoint -> per-stage ONNX graphs + manifest.json + calibration.npz.

Top-level imports stay light (argparse only): torch, onnx and onnxruntime load inside `run`.
Exit status: 0 on success; 1 when the export fails a check (graph check, parity, calibration) —
in that case nothing is written at --out (the work happens in a temporary directory).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


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
    parser.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="int8: also quantize the stage graphs (export.quantize: int8 where measured faster, "
        "calibration recomputed through the int8 engine); the options below apply",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    from export.commands.quantize import add_quantize_options

    add_quantize_options(parser.add_argument_group("int8 (--precision int8)"))


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
    if args.precision == "int8":
        if not args.calibrate:
            print("export: --precision int8 needs calibration (drop --no-calibrate)", file=sys.stderr)
            return 2
        return _export_int8(args, options)
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


def _export_int8(args: argparse.Namespace, options: Any) -> int:
    """fp32 export into a scratch directory beside --out, then `boostserve quantize` of it into --out."""
    import dataclasses
    import shutil
    import tempfile
    from pathlib import Path

    from export.commands.quantize import print_result, quantize_options
    from export.errors import ExportError
    from export.quantize import quantize_artifact
    from export.source import export_from_checkpoint
    from service.core.artifact import ArtifactError

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"export failed: {out} already exists (pass --overwrite to replace it)", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.fp32-", dir=out.parent))
    try:
        fp32 = export_from_checkpoint(
            args.checkpoint,
            args.data,
            scratch / "fp32",
            dataclasses.replace(options, overwrite=False),
            name=args.name,
            heldout_size=args.heldout_size,
            seed=args.seed,
        )
        result = quantize_artifact(
            fp32.path,
            out,
            args.data,
            quantize_options(args, threads=options.threads, overwrite=args.overwrite, progress=options.progress),
        )
    except (ExportError, ArtifactError) as exc:
        print(f"export failed: {exc}\nnothing was written to {args.out}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"parity max abs (torch vs fp32 ONNX, logits): {fp32.parity.worst:.2e}")
    print_result(result)
    return 0
