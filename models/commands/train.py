"""`boostserve train`: train a preset on Fashion-MNIST, CIFAR or an image folder."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="model preset (see `boostserve macs --list`)")
    parser.add_argument(
        "--data",
        default="/usr/share/datasets/fashion-mnist",
        help="dataset directory (Fashion-MNIST IDX, CIFAR python, or train/+test/ image folders)",
    )
    parser.add_argument("--out", required=True, help="run directory (checkpoint.pt, last.pt, history.json, ...)")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak / initial learning rate")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="override the preset's precision: bf16 autocasts forward + loss (fast on CPUs with AVX512-BF16)",
    )
    parser.add_argument("--t", type=float, help="boosting factor t (0.5 paper default; 0 = joint-training baseline)")
    parser.add_argument("--no-stop-grad", action="store_true", help="let exit k's loss reach earlier heads")
    parser.add_argument("--no-grad-rescale", action="store_true", help="disable MSDNet gradient rescaling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-size", type=int, default=5000, help="seeded validation split carved from train")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument(
        "--freeze-backbone",
        metavar="CKPT",
        help="exits on a trained network: load CKPT (same config) whole, keep it frozen with its own final "
        "classifier as the last exit (t defaults to 0) and train only the earlier exit heads",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="train only the last exit (t=0): a plain network to attach exits to later",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"boostserve train: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from models.config import get_preset
    from models.data import DataError
    from models.training import TrainError, TrainOptions, train

    try:
        config = get_preset(args.config)
    except KeyError as exc:
        return _fail(str(exc.args[0]))
    tc = config.training
    tc = replace(
        tc,
        **{
            k: v
            for k, v in (
                ("epochs", args.epochs),
                ("batch_size", args.batch_size),
                ("lr", args.lr),
                ("precision", args.precision),
            )
            if v is not None
        },
    )
    boosting = {}
    if args.t is not None:
        boosting["t"] = args.t
    elif args.freeze_backbone:
        boosting["t"] = 0.0  # the frozen network's last exit stays its own answer
    if args.no_stop_grad:
        boosting["stop_grad"] = False
    if args.no_grad_rescale:
        boosting["grad_rescale"] = False
    config = replace(config.with_boosting(**boosting), training=tc)
    opts = TrainOptions(
        data_dir=args.data,
        out_dir=args.out,
        seed=args.seed,
        heldout_size=args.heldout_size,
        resume=args.resume,
        freeze_backbone=args.freeze_backbone,
        plain=args.plain,
        device=args.device,
        threads=args.threads,
        quiet=args.quiet,
    )
    try:
        train(config, opts)
    except (DataError, TrainError) as exc:
        return _fail(str(exc))
    return 0
