"""`boostserve eval`: per-exit test accuracy and cumulative MACs of a checkpoint (anytime mode)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", help="dataset directory (default: the one recorded in the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from models.checkpoint import load_checkpoint
    from models.data import load_splits
    from models.macs import count_exit_costs
    from models.training import evaluate, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    ck = load_checkpoint(args.checkpoint)
    data_meta = ck.meta.get("data", {})
    data_dir = args.data or data_meta.get("data_dir")
    if not data_dir:
        raise SystemExit("--data is required (the checkpoint records no data directory)")
    splits = load_splits(
        data_dir,
        heldout_size=0,
        image_size=ck.config.image_size,
        mean=ck.config.mean,
        std=ck.config.std,
        augment="none",
    )
    device = resolve_device(args.device)
    model = ck.model.to(device)
    acc = evaluate(model, splits.test, device, args.batch_size)
    costs = count_exit_costs(model)
    exits = [
        {
            "exit": c.exit,
            "test_acc": a,
            "cumulative_macs": c.cumulative_macs,
            "cumulative_params": c.cumulative_params,
        }
        for c, a in zip(costs, acc, strict=True)
    ]
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "config": ck.config.name, "exits": exits}))
    else:
        print(f"{ck.config.name}  ({len(splits.test)} test images, t={ck.config.boosting.t})")
        print(f"{'exit':>4} {'test acc %':>10} {'cum MMACs':>10} {'cum Mparams':>11}")
        for e in exits:
            print(
                f"{e['exit']:>4} {e['test_acc']:>10.2f} {e['cumulative_macs'] / 1e6:>10.2f} "
                f"{e['cumulative_params'] / 1e6:>11.3f}"
            )
    return 0
