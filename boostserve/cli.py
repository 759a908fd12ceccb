"""The single `boostserve` command line.

Subcommands live in their own packages (`models.commands.*`, `export.commands.*`,
`service.commands.*`, `bench.commands.*`). Each module exposes `configure(parser)` and
`run(args) -> int` and keeps its top-level imports light. Only the module of the subcommand
being run is imported, so `boostserve serve` never imports torch and `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from boostserve import __version__


class Command(NamedTuple):
    module: str
    summary: str


COMMANDS: dict[str, Command] = {
    "train": Command("models.commands.train", "train a BoostNet on Fashion-MNIST, CIFAR or an image folder"),
    "eval": Command("models.commands.evaluate", "per-exit test accuracy and cumulative MACs of a checkpoint"),
    "macs": Command("models.commands.macs", "per-exit MACs and parameters of a model preset"),
    "export": Command("export.commands.export", "export a checkpoint to per-stage ONNX + manifest, calibrated"),
    "attach-exits": Command(
        "export.commands.attach_exits", "early exits on an ONNX classifier you already have, or a cascade of several"
    ),
    "thresholds": Command("service.commands.thresholds", "turn a compute budget into per-exit thresholds"),
    "quantize": Command(
        "export.commands.quantize", "an fp32 artifact -> int8 stage graphs where measured faster, recalibrated"
    ),
    "recalibrate": Command(
        "export.commands.recalibrate", "rewrite an artifact's calibration arrays through the serving engine"
    ),
    "report": Command("export.commands.report", "accuracy-vs-MACs curves, tables and plots on the test split"),
    "serve": Command("service.commands.serve", "start the HTTP service (uvicorn, one worker)"),
    "bench": Command("bench.commands.bench", "benchmarks: offline, engine and HTTP suites"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boostserve",
        description="Boosted early-exit image classification: train, export, calibrate, serve, benchmark.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `boostserve COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"boostserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, command in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=command.summary, description=command.summary)
        if name == chosen:
            importlib.import_module(command.module).configure(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    module = importlib.import_module(COMMANDS[args.command].module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
