"""The training loop behind `boostserve train`.

Plain loop (no framework): per-batch augmentation on in-memory uint8 tensors, summed boosted
cross-entropy, a per-step learning-rate schedule computed in closed form (so resuming needs no
scheduler object), per-exit accuracies each epoch on train (running, augmented) and held-out,
history.json and RUN_DIR/last.pt every epoch, checkpoint.pt at the end.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.boosting import BoostedNet, boosted_loss
from models.build import build_model
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import ModelConfig, TrainingConfig
from models.data import ArrayDataset, load_splits, write_split_json
from models.macs import count_exit_costs


@dataclass(frozen=True)
class TrainOptions:
    data_dir: str
    out_dir: str
    seed: int = 0
    heldout_size: int = 5000
    resume: bool = False
    freeze_backbone: str | None = None  # checkpoint whose non-head weights are loaded and frozen
    plain: bool = False  # loss on the last exit only (a plain network; seed 001's starting point)
    device: str = "auto"
    threads: int | None = None
    quiet: bool = False
    dataset: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def lr_at(tc: TrainingConfig, step: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    frac = step / max(1, total_steps)
    if tc.schedule == "onecycle":  # linear warm-up over 25 %, cosine down to lr/1e4
        warm = 0.25
        if frac < warm:
            return tc.lr * (0.04 + 0.96 * frac / warm)
        p = (frac - warm) / (1 - warm)
        return tc.lr * (1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * p)))
    if tc.schedule == "cosine":
        return tc.lr * 0.5 * (1 + math.cos(math.pi * frac))
    drops = sum(frac >= m for m in tc.milestones)
    return tc.lr * (0.1**drops)


@torch.no_grad()
def evaluate(model: BoostedNet, data: ArrayDataset, device: torch.device, batch_size: int = 500) -> list[float]:
    """Per-exit top-1 accuracy (%) of the cumulative logits F_k."""
    model.eval()
    correct = torch.zeros(model.num_stages, dtype=torch.long)
    for x, y in data.batches(batch_size):
        outs = model(x.to(device))
        for k, o in enumerate(outs):
            correct[k] += int((o.argmax(1).cpu() == y).sum())
    return [100.0 * int(c) / max(1, len(data)) for c in correct]


class TrainError(ValueError):
    """The inputs cannot train this config (channels, a backbone checkpoint that does not fit).

    Why a type: `boostserve train` reports these (and `DataError`) as one line, exit 2; any other
    exception is a bug and keeps its traceback.
    """


def _frozen_backbone_from(model: BoostedNet, path: str) -> None:
    """Copy the network of checkpoint `path` (every weight and BN statistic but heads 0..N-2) and freeze it.

    The last head is the network's own final classifier: copied and frozen with the rest, so with
    t = 0 the last exit is the checkpoint's network unchanged (see BoostedNet.freeze_backbone).
    """
    src = load_checkpoint(path).model.state_dict()
    own = model.state_dict()
    last = model.last_head_prefix()
    copied = 0
    for key, value in src.items():
        if key.startswith("backbone.heads.") and not key.startswith(last):
            continue
        if key not in own or own[key].shape != value.shape:
            raise TrainError(f"--freeze-backbone {path}: {key} does not match this config's backbone")
        own[key].copy_(value)
        copied += 1
    if copied == 0:
        raise TrainError(f"--freeze-backbone {path}: no backbone weights found")
    model.freeze_backbone()


def train(config: ModelConfig, opts: TrainOptions) -> dict[str, Any]:
    """Train; write RUN_DIR/{history,split,results}.json, last.pt and checkpoint.pt; return the results."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = resolve_device(opts.device)
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc = config.training
    if opts.plain:
        config = config.with_boosting(t=0.0)

    torch.manual_seed(opts.seed)
    splits = load_splits(
        opts.data_dir,
        dataset=opts.dataset,
        heldout_size=opts.heldout_size,
        seed=opts.seed,
        image_size=config.image_size,
        mean=config.mean,
        std=config.std,
        augment=tc.augment,
        crop_padding=tc.crop_padding,
    )
    if splits.train.images.shape[1] != config.in_channels:
        raise TrainError(
            f"{config.name} expects {config.in_channels} channels, data has {splits.train.images.shape[1]}"
        )
    n_classes = len(splits.class_names)
    if n_classes != config.num_classes:
        config = replace(config, num_classes=n_classes)
    write_split_json(out / "split.json", splits, opts.data_dir, opts.seed)
    data_meta = splits.split_record(opts.data_dir, opts.seed)

    model = build_model(config)
    if opts.freeze_backbone:
        _frozen_backbone_from(model, opts.freeze_backbone)
        if config.boosting.t != 0:
            print(
                f"warning: --freeze-backbone with t = {config.boosting.t:g}: the last exit becomes "
                "f_last + t * F_(N-2), no longer the frozen network's own answer (t = 0 keeps it)",
                file=sys.stderr,
            )
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov, weight_decay=tc.weight_decay
    )
    gen = torch.Generator().manual_seed(opts.seed)
    steps_per_epoch = len(splits.train) // tc.batch_size
    total_steps = steps_per_epoch * tc.epochs
    history: list[dict[str, Any]] = []
    start_epoch, elapsed = 0, 0.0

    last = out / "last.pt"
    if opts.resume and last.is_file():
        ck = load_checkpoint(last)
        model.load_state_dict(ck.model.state_dict())
        assert ck.train_state is not None
        optimizer.load_state_dict(ck.train_state["optimizer"])
        gen.set_state(ck.train_state["generator"])
        torch.set_rng_state(ck.train_state["torch_rng"])
        start_epoch = int(ck.train_state["epoch"])
        elapsed = float(ck.train_state["elapsed_s"])
        history = list(ck.meta.get("history", []))
        print(f"resumed from {last} at epoch {start_epoch}", file=sys.stderr)

    from tqdm import tqdm

    show_bar = not opts.quiet and sys.stderr.isatty()
    n = model.num_stages
    for epoch in range(start_epoch, tc.epochs):
        t0 = time.time()
        model.train()
        correct = torch.zeros(n, dtype=torch.long)
        seen = 0
        loss_sum = 0.0
        bar = tqdm(
            splits.train.batches(tc.batch_size, shuffle=True, generator=gen, drop_last=True),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            disable=not show_bar,
            leave=False,
        )
        for i, (x, y) in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(tc, epoch * steps_per_epoch + i, total_steps)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
                outs = model(x)
                outs = [o.float() for o in outs]  # (B, classes) each; the loss and accuracies in fp32
                if opts.plain:
                    loss = F.cross_entropy(outs[-1], y)
                else:
                    loss, _ = boosted_loss(outs, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for k, o in enumerate(outs):
                    correct[k] += int((o.argmax(1) == y).sum())
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            if show_bar and i % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{100.0 * int(correct[-1]) / seen:.1f}")
        bar.close()
        train_acc = [100.0 * int(c) / max(1, seen) for c in correct]
        val_acc = evaluate(model, splits.heldout, device) if len(splits.heldout) else []
        epoch_s = time.time() - t0
        elapsed += epoch_s
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(1, seen),
            "train_acc": train_acc,
            "val_acc": val_acc,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": epoch_s,
        }
        history.append(record)
        print(
            f"epoch {epoch + 1}/{tc.epochs} loss {record['loss']:.4f} "
            f"train {' '.join(f'{a:.1f}' for a in train_acc)} | val {' '.join(f'{a:.1f}' for a in val_acc)} "
            f"({epoch_s:.0f}s)",
            flush=True,
        )
        (out / "history.json").write_text(json.dumps(history, indent=1))
        save_checkpoint(
            last,
            model,
            config,
            train_state={
                "optimizer": optimizer.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch + 1,
                "elapsed_s": elapsed,
            },
            history=history,
            data=data_meta,
        )

    test_acc = evaluate(model, splits.test, device)
    costs = count_exit_costs(model)
    results = {
        "config": config.name,
        "boosting": asdict(config.boosting),
        "epochs": tc.epochs,
        "seed": opts.seed,
        "train_seconds": elapsed,
        "test_acc": test_acc,
        "val_acc": history[-1]["val_acc"] if history else [],
        "exits": [{**asdict(c), "test_acc": a} for c, a in zip(costs, test_acc, strict=True)],
        "plain": opts.plain,
        "frozen_backbone": opts.freeze_backbone,
    }
    save_checkpoint(
        out / "checkpoint.pt",
        model,
        config,
        history=history,
        data=data_meta,
        results=results,
        class_names=list(splits.class_names),
        training=config.to_dict()["training"],
    )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("test " + " ".join(f"{a:.2f}" for a in test_acc) + f"  ({elapsed / 60:.1f} min training)")
    return results
