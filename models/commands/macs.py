"""`boostserve macs`: per-exit MACs and parameters of a preset (paper counting convention)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="model preset name")
    parser.add_argument("--list", action="store_true", help="list the presets")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import json

    from models.config import PRESETS, get_preset

    if args.list or not args.config:
        for name in sorted(PRESETS):
            print(name)
        return 0 if args.list else 2

    from models.build import build_model
    from models.macs import count_exit_costs

    config = get_preset(args.config)
    costs = count_exit_costs(build_model(config))
    exits = [
        {
            "exit": c.exit,
            "macs": c.macs,
            "cumulative_macs": c.cumulative_macs,
            "params": c.params,
            "cumulative_params": c.cumulative_params,
        }
        for c in costs
    ]
    if args.json:
        print(json.dumps({"config": config.name, "exits": exits}))
        return 0
    print(f"{config.name}  input {config.input_shape}  ({config.num_classes} classes)")
    print(f"{'exit':>4} {'MMACs':>8} {'cum MMACs':>10} {'Mparams':>8} {'cum Mparams':>11}")
    for e in exits:
        print(
            f"{e['exit']:>4} {e['macs'] / 1e6:>8.2f} {e['cumulative_macs'] / 1e6:>10.2f} "
            f"{e['params'] / 1e6:>8.3f} {e['cumulative_params'] / 1e6:>11.3f}"
        )
    return 0
