"""`boostserve attach-exits`: early exits on an ONNX classifier you already have (docs/byom.md).

Top-level imports stay light (argparse only): onnx, onnxruntime and torch load inside `run`.
Exit status: 0 on success; 1 with one line on stderr for any input the command cannot use (a cut
tensor that does not exist or does not separate the graph, a model with several outputs, a
dataset whose classes do not match the model's output size, ...); nothing is written at --out then.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Attach exits to a trained ONNX classifier without retraining it, or chain several classifiers
into a cascade, and write an artifact `boostserve serve --artifacts OUT` serves.

One --model: the graph is cut at --cuts (tensor names, or auto:K = K cuts spread by cumulative
MACs; --list-cuts shows the candidates), an exit head (global average pool + linear) is trained
per cut on features ONNX Runtime computes over the training images, and the last exit is the
model's own output, bit for bit. --cuts none serves the model whole (one stage).
Several --model (cheapest first): a cascade of separate networks, each reading the image.

The dataset's held-out split (--heldout-size, --seed) calibrates the exits and must hold images
the model was not trained on.

examples:
  boostserve attach-exits --model net.onnx --list-cuts
  boostserve attach-exits --model net.onnx --data /usr/share/datasets/fashion-mnist \\
      --mean 0.2860 --std 0.3530 --cuts auto:3 --out artifacts/net-exits
  boostserve attach-exits --model small.onnx --model large.onnx --data DIR \\
      --preprocessing pre.json --out artifacts/cascade
"""

EXIT_FAILED = 1


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    parser.add_argument(
        "--model", action="append", required=True, metavar="ONNX", help="classifier file; repeat for a cascade"
    )
    parser.add_argument("--list-cuts", action="store_true", help="list the tensors the model can be cut at, and exit")
    parser.add_argument("--data", help="dataset: Fashion-MNIST IDX, CIFAR python, or train/+test/ class folders")
    parser.add_argument("--out", help="artifact directory to create")
    parser.add_argument(
        "--cuts",
        default=None,
        help="auto:K, none, or comma-separated tensor names in graph order (default: auto:3 for one model)",
    )
    pre = parser.add_argument_group("preprocessing (what the model expects; or --preprocessing FILE)")
    pre.add_argument(
        "--preprocessing", metavar="JSON", help='{"mean": [...], "std": [...], "size": N, "color_mode": "L"}'
    )
    pre.add_argument(
        "--mean", type=_floats, help="per-channel mean after scaling pixels to [0, 1], e.g. 0.485,0.456,0.406"
    )
    pre.add_argument("--std", type=_floats, help="per-channel std, e.g. 0.229,0.224,0.225")
    pre.add_argument("--size", type=int, help="square input side (default: the model's)")
    pre.add_argument("--color-mode", choices=("L", "RGB"), help="default: from the model's channel count")
    pre.add_argument("--resize", choices=("bilinear", "nearest", "bicubic"), default="bilinear")
    parser.add_argument(
        "--t", type=float, default=0.0, help="boost each head over the earlier ones, F_k = f_k + t F_(k-1) (default 0)"
    )
    parser.add_argument(
        "--heldout-size", type=int, default=5000, help="held-out images carved from train (default 5000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="held-out split seed (default 0)")
    parser.add_argument("--cache-dir", help="cache the cut features here (reused when model, cuts and images match)")
    parser.add_argument("--batch-size", type=int, default=256, help="feature extraction / calibration batch (256)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime / torch threads (default 2)")
    parser.add_argument("--name", help="model name in the manifest (default: the file name)")
    parser.add_argument("--no-test", dest="include_test", action="store_false", help="do not store test-split arrays")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _fail(message: str) -> int:
    print(f"boostserve attach-exits: error: {message}", file=sys.stderr)
    return EXIT_FAILED


def _list_cuts(paths: list[str]) -> int:
    from export.attach.graph import cut_candidates, distinct_positions, load_classifier

    for path in paths:
        classifier = load_classifier(path)
        candidates = cut_candidates(classifier)
        spread = {c.name for c in distinct_positions(candidates, classifier.total_macs)}
        total = classifier.total_macs
        print(
            f"{path}: input {classifier.input_name} {classifier.image_shape}, output {classifier.output_name} "
            f"({classifier.num_classes} classes), {total / 1e6:.2f} MMACs"
        )
        print(f"{'cum MMACs':>10} {'% full':>7}  {'auto':>4}  {'op':<18} {'shape':<16} tensor")
        for c in candidates:
            mark = "yes" if c.name in spread else ""
            print(
                f"{c.cumulative_macs / 1e6:>10.2f} {100 * c.cumulative_macs / total:>7.1f}  {mark:>4}  "
                f"{c.op:<18} {'x'.join(map(str, c.shape)):<16} {c.name}"
            )
    return 0


def run(args: argparse.Namespace) -> int:
    from export.attach.errors import AttachError

    try:
        if args.list_cuts:
            return _list_cuts(args.model)
        if not args.data or not args.out:
            return _fail("--data and --out are required (or pass --list-cuts)")
        import torch

        from export.attach.build import AttachOptions, PreprocessingSpec, attach_exits, read_preprocessing

        torch.set_num_threads(max(1, args.threads))
        if args.preprocessing:
            if args.mean or args.std:
                return _fail("give the preprocessing either as --preprocessing FILE or as --mean/--std, not both")
            spec = read_preprocessing(args.preprocessing)
        else:
            if not args.mean or not args.std:
                return _fail("the model's preprocessing is needed: --mean and --std (or --preprocessing FILE)")
            spec = PreprocessingSpec(
                mean=args.mean, std=args.std, size=args.size, color_mode=args.color_mode, resize=args.resize
            )
        from pathlib import Path

        options = AttachOptions(
            cuts=args.cuts,
            t=args.t,
            heldout_size=args.heldout_size,
            seed=args.seed,
            batch_size=args.batch_size,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            include_test=args.include_test,
            overwrite=args.overwrite,
            progress=not args.quiet,
            threads=max(1, args.threads),
            name=args.name,
        )
        result = attach_exits(args.model, args.data, args.out, spec, options)
    except AttachError as exc:
        return _fail(str(exc))
    manifest = result.manifest
    print(f"wrote {result.path} (model {manifest.name}, version {manifest.version}, {manifest.num_stages} exits)")
    print(f"last exit equals the original model bit for bit on all {result.parity_images} calibration images")
    assert manifest.calibration is not None
    print("held-out accuracy per exit: " + " ".join(f"{a:.4f}" for a in manifest.calibration.heldout_accuracy))
    if manifest.calibration.test_accuracy is not None:
        print("test accuracy per exit:     " + " ".join(f"{a:.4f}" for a in manifest.calibration.test_accuracy))
    full = manifest.full_macs
    print(
        "cumulative MMACs per exit:  "
        + " ".join(f"{m / 1e6:.2f}" for m in manifest.cumulative_macs)
        + f" (full {full / 1e6:.2f})"
    )
    return 0
