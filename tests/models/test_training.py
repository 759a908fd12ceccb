from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.build import build_model
from models.checkpoint import load_checkpoint
from models.training import TrainOptions, lr_at, train

from .conftest import tiny_compact


def test_tiny_training_reduces_the_loss(idx_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = train(tiny_compact(), TrainOptions(str(idx_dir), str(out), heldout_size=40, quiet=True, threads=1))
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 4
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert len(results["test_acc"]) == 3 and results["test_acc"][-1] > 50
    split = json.loads((out / "split.json").read_text())
    assert split["heldout_size"] == 40 and split["split_seed"] == 0 and len(split["heldout_indices"]) == 40
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck.meta["data"]["heldout_size"] == 40 and ck.meta["data"]["dataset"] == "fashion-mnist"
    assert (out / "last.pt").is_file()


def test_bf16_training_reduces_the_loss_and_keeps_fp32_weights(idx_dir: Path, tmp_path: Path) -> None:
    """precision="bf16" autocasts forward + loss only: weights and checkpoints stay float32."""
    config = replace(tiny_compact(), training=replace(tiny_compact().training, precision="bf16"))
    out = tmp_path / "bf16"
    train(config, TrainOptions(str(idx_dir), str(out), heldout_size=40, quiet=True, threads=1))
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    fp32 = tmp_path / "fp32"
    train(tiny_compact(), TrainOptions(str(idx_dir), str(fp32), heldout_size=40, quiet=True, threads=1))
    assert history[0]["loss"] != json.loads((fp32 / "history.json").read_text())[0]["loss"]  # bf16 really ran
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck.config.training.precision == "bf16"
    assert all(t.dtype == torch.float32 for t in ck.model.state_dict().values() if t.is_floating_point())


def test_same_seed_same_weights_and_resume(idx_dir: Path, tmp_path: Path) -> None:
    config = replace(tiny_compact(), training=replace(tiny_compact().training, epochs=2))
    a = train(config, TrainOptions(str(idx_dir), str(tmp_path / "a"), heldout_size=40, quiet=True))
    b = train(config, TrainOptions(str(idx_dir), str(tmp_path / "b"), heldout_size=40, quiet=True))
    assert a["test_acc"] == b["test_acc"]
    wa = load_checkpoint(tmp_path / "a" / "checkpoint.pt").model.state_dict()
    wb = load_checkpoint(tmp_path / "b" / "checkpoint.pt").model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # resuming a finished run trains no more epochs and keeps the history
    train(config, TrainOptions(str(idx_dir), str(tmp_path / "a"), heldout_size=40, quiet=True, resume=True))
    assert len(json.loads((tmp_path / "a" / "history.json").read_text())) == 2


def test_frozen_backbone_trains_only_the_heads(idx_dir: Path, tmp_path: Path) -> None:
    config = replace(tiny_compact(), training=replace(tiny_compact().training, epochs=1))
    train(config, TrainOptions(str(idx_dir), str(tmp_path / "plain"), heldout_size=40, quiet=True, plain=True))
    base = load_checkpoint(tmp_path / "plain" / "checkpoint.pt").model.state_dict()
    train(
        config,
        TrainOptions(
            str(idx_dir),
            str(tmp_path / "heads"),
            heldout_size=40,
            quiet=True,
            freeze_backbone=str(tmp_path / "plain" / "checkpoint.pt"),
        ),
    )
    tuned = load_checkpoint(tmp_path / "heads" / "checkpoint.pt").model.state_dict()
    backbone_keys = [k for k in base if not k.startswith("backbone.heads.")]
    assert backbone_keys and all(torch.equal(base[k], tuned[k]) for k in backbone_keys)
    head_keys = [k for k in base if k.startswith("backbone.heads.")]
    assert any(not torch.equal(base[k], tuned[k]) for k in head_keys)


def test_freeze_backbone_leaves_only_head_parameters_trainable() -> None:
    model = build_model(tiny_compact())
    model.freeze_backbone()
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    last = model.last_head_prefix()
    assert trainable == {n for n in model.head_parameter_names() if not n.startswith(last)} and trainable
    assert not model.backbone.stages[0].training and model.backbone.heads[0].training
    assert not model.backbone.heads[-1].training  # the network's own classifier stays frozen


def test_frozen_backbone_keeps_the_network_as_its_last_exit(idx_dir: Path, tmp_path: Path) -> None:
    """Seed 001: with t = 0 the last exit after head training answers exactly what the plain network did."""
    from models.data import load_splits

    config = replace(tiny_compact(), training=replace(tiny_compact().training, epochs=1)).with_boosting(t=0.0)
    train(config, TrainOptions(str(idx_dir), str(tmp_path / "plain"), heldout_size=40, quiet=True, plain=True))
    plain = load_checkpoint(tmp_path / "plain" / "checkpoint.pt").model
    opts = TrainOptions(
        str(idx_dir),
        str(tmp_path / "heads"),
        heldout_size=40,
        quiet=True,
        freeze_backbone=str(tmp_path / "plain" / "checkpoint.pt"),
    )
    train(config, opts)
    tuned = load_checkpoint(tmp_path / "heads" / "checkpoint.pt").model
    images, _ = next(load_splits(idx_dir, heldout_size=40, augment="none").test.batches(32))
    with torch.no_grad():
        before, after = plain(images), tuned(images)
    assert torch.equal(before[-1], after[-1])
    assert not torch.equal(before[0], after[0])  # the earlier heads did train


def test_onecycle_schedule_warms_up_and_anneals() -> None:
    from models.config import get_preset

    tc = get_preset("compact-fashion-mnist").training
    lrs = [lr_at(tc, s, 1000) for s in range(1000)]
    assert max(lrs) == lrs[250] == tc.lr and lrs[0] < 0.1 * tc.lr and lrs[-1] < 0.01 * tc.lr


def test_cli_train_then_eval(idx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from boostserve.cli import main

    out = tmp_path / "cli"
    args = ["train", "--config", "compact-fashion-mnist", "--data", str(idx_dir), "--out", str(out)]
    args += [
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--heldout-size",
        "40",
        "--t",
        "0",
        "--quiet",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck.config.boosting.t == 0.0 and ck.config.training.epochs == 1
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--json", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["exit"] for e in report["exits"]] == [1, 2, 3, 4]
    assert report["exits"][0]["cumulative_macs"] < report["exits"][-1]["cumulative_macs"]


def test_cli_freeze_backbone_defaults_to_t0(idx_dir: Path, tmp_path: Path) -> None:
    """`boostserve train --freeze-backbone` on a t = 0.5 preset trains with t = 0: the last exit stays the network's."""
    from boostserve.cli import main

    common = ["--config", "small-fashion-mnist", "--data", str(idx_dir), "--epochs", "1", "--heldout-size", "40"]
    common += ["--quiet", "--threads", "1"]
    assert main(["train", *common, "--out", str(tmp_path / "plain"), "--plain"]) == 0
    plain_ck = str(tmp_path / "plain" / "checkpoint.pt")
    assert main(["train", *common, "--out", str(tmp_path / "heads"), "--freeze-backbone", plain_ck]) == 0
    tuned = load_checkpoint(tmp_path / "heads" / "checkpoint.pt")
    assert tuned.config.boosting.t == 0.0
    image = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(plain_ck).model(image)[-1], tuned.model(image)[-1])
