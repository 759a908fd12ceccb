from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.data import (
    FASHION_MNIST_CLASSES,
    DataError,
    TrainTransform,
    detect_dataset,
    heldout_indices,
    load_splits,
)


def test_idx_fashion_mnist_layout(idx_dir: Path) -> None:
    splits = load_splits(idx_dir, heldout_size=40, seed=0)
    assert splits.dataset == "fashion-mnist"
    assert splits.class_names == FASHION_MNIST_CLASSES
    assert (len(splits.train), len(splits.heldout), len(splits.test)) == (200, 40, 60)
    x, y = splits.test[0]
    assert x.shape == (1, 12, 12) and x.dtype == torch.float32 and isinstance(y, int)


def test_cifar10_and_cifar100_pickles(cifar10_dir: Path, cifar100_dir: Path) -> None:
    s10 = load_splits(cifar10_dir, heldout_size=5, seed=0)
    assert s10.dataset == "cifar10" and s10.class_names[:2] == ("c0", "c1")
    assert (len(s10.train), len(s10.heldout), len(s10.test)) == (15, 5, 3)
    assert s10.train[0][0].shape == (3, 32, 32)
    assert sorted(s10.test.labels.tolist()) == [0, 1, 9]
    s100 = load_splits(cifar100_dir, heldout_size=2, seed=0)
    assert s100.dataset == "cifar100" and len(s100.class_names) == 100
    assert s100.test.labels.tolist() == [0, 1, 2, 3, 99]


def test_imagefolder_tree(imagefolder_dir: Path) -> None:
    splits = load_splits(imagefolder_dir, heldout_size=2, seed=0, image_size=8)
    assert splits.dataset == "imagefolder" and splits.class_names == ("cat", "dog")
    assert len(splits.train) == 4 and len(splits.test) == 4
    assert splits.test[0][0].shape == (3, 8, 8)


def test_heldout_split_is_seeded_and_disjoint() -> None:
    tr_a, ho_a = heldout_indices(100, 20, seed=3)
    _, ho_b = heldout_indices(100, 20, seed=3)
    _, ho_c = heldout_indices(100, 20, seed=4)
    assert torch.equal(ho_a, ho_b) and not torch.equal(ho_a, ho_c)
    assert set(tr_a.tolist()).isdisjoint(ho_a.tolist())
    assert sorted(tr_a.tolist() + ho_a.tolist()) == list(range(100))


def test_heldout_uses_eval_transform(idx_dir: Path) -> None:
    splits = load_splits(idx_dir, heldout_size=40, seed=0, crop_padding=2)
    assert isinstance(splits.train.transform, TrainTransform)
    assert not isinstance(splits.heldout.transform, TrainTransform)
    assert not isinstance(splits.test.transform, TrainTransform)
    a, b = splits.heldout[3][0], splits.heldout[3][0]
    torch.testing.assert_close(a, b)


def test_train_transform_crops_and_flips_with_a_seed() -> None:
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    t = TrainTransform((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), padding=2)
    a = t(images, torch.Generator().manual_seed(1))
    b = t(images, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.shape == images.shape
    assert not torch.allclose(a, images.float() / 255)


def test_missing_dir_says_how_to_get_the_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_splits(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="cannot recognise"):
        detect_dataset(tmp_path / "junk")


def test_truncated_idx_is_reported(idx_dir: Path) -> None:
    import gzip

    with gzip.open(idx_dir / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (60).to_bytes(4, "big") + (12).to_bytes(4, "big") * 2 + b"\x00" * 10)
    with pytest.raises(DataError, match="truncated"):
        load_splits(idx_dir, heldout_size=10)


def test_random_crop_offsets_vary_within_a_batch() -> None:
    image = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(32, 1, 1, 1)
    t = TrainTransform((0.0,), (1.0,), padding=2, flip=False)
    out = t(image, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 5  # up to 25 offsets
    assert (out * 255).round().max() <= 63  # crops of the zero-padded image, no new values
