"""Datasets: Fashion-MNIST (IDX .gz), CIFAR-10/100 (python pickles) and ImageFolder trees.

Everything is loaded once into a uint8 tensor (N, C, H, W) in memory (these sets are small), and
transforms work on whole batches with plain torch ops (no torchvision: there is no CPU wheel
here). A seeded held-out split is carved from the training set; it and the test set use the
eval transform (normalisation only), unlike the reference code whose validation images carried
training augmentation.
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DATASET_KINDS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_DEFAULT_NORM = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


class DataError(ValueError):
    """The data directory is missing or not in a format we read; the message says what is expected."""


_HOW_TO_GET = (
    "Expected one of: Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; install them with "
    "`apt-get install dataset-fashion-mnist`, "
    f"which puts them in {DEFAULT_FASHION_MNIST_DIR}), a CIFAR python folder (cifar-10-batches-py with "
    "data_batch_1..5, test_batch, batches.meta; or cifar-100-python with train, test, meta), or an image "
    "folder with train/ and test/ subfolders holding one folder per class."
)


# ---------------------------------------------------------------------------------------------
# Transforms (batched, torch only)
# ---------------------------------------------------------------------------------------------


class EvalTransform:
    """uint8 (B, C, H, W) -> float32 normalised (B, C, H, W)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return (images.float().div_(255.0) - self.mean) / self.std


class TrainTransform(EvalTransform):
    """RandomCrop(size, padding, zero fill) + horizontal flip (p=0.5), then normalisation."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], padding: int = 4, flip: bool = True) -> None:
        super().__init__(mean, std)
        self.padding = padding
        self.flip = flip

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, _c, h, w = images.shape
        x = images
        if self.padding > 0:
            p = self.padding
            padded = F.pad(images, (p, p, p, p))  # (B, C, H+2p, W+2p), zeros = black like torchvision
            offsets = torch.randint(0, 2 * p + 1, (b, 2), generator=generator).tolist()
            x = torch.empty_like(images)
            # A slice copy per image is far cheaper than one big advanced-indexing gather.
            for i, (oy, ox) in enumerate(offsets):
                x[i] = padded[i, :, oy : oy + h, ox : ox + w]
        x = x.float().div_(255.0)
        if self.flip:
            mask = torch.rand(b, generator=generator) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return (x - self.mean) / self.std


# ---------------------------------------------------------------------------------------------
# Dataset and batching
# ---------------------------------------------------------------------------------------------


class ArrayDataset(Dataset[tuple[Tensor, int]]):
    """In-memory images (uint8 (N, C, H, W)) and labels; yields (float (C, H, W) normalised, int)."""

    def __init__(self, images: Tensor, labels: Tensor, transform: EvalTransform) -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) == len(labels)
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(self.images[i : i + 1])[0], int(self.labels[i])

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Fast path used by training/eval: whole batches transformed at once."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield self.transform(self.images[idx], generator), self.labels[idx]


@dataclass(frozen=True)
class Splits:
    train: ArrayDataset
    heldout: ArrayDataset
    test: ArrayDataset
    class_names: tuple[str, ...]
    dataset: str
    heldout_indices: tuple[int, ...] = ()  # indices into the original training set

    def split_record(self, data_dir: str | Path, seed: int) -> dict[str, Any]:
        """What goes into split.json and the checkpoint meta."""
        return {
            "dataset": self.dataset,
            "data_dir": str(data_dir),
            "heldout_size": len(self.heldout),
            "split_seed": seed,
            "num_train": len(self.train),
            "num_test": len(self.test),
        }


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def _find(data_dir: Path, name: str) -> Path | None:
    for cand in (data_dir / name, data_dir / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file. {_HOW_TO_GET}")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file (header says {dims}, got {data.size} bytes)")
    return data.reshape(dims)


def _load_fashion_mnist(d: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[str, ...]]:
    arrays = []
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        path = _find(d, name)
        if path is None:
            raise DataError(f"{d}: missing {name}.gz. {_HOW_TO_GET}")
        arrays.append(_read_idx(path))
    xtr, ytr, xte, yte = arrays
    return (
        torch.from_numpy(xtr.copy()).unsqueeze(1),
        torch.from_numpy(ytr.astype(np.int64)),
        torch.from_numpy(xte.copy()).unsqueeze(1),
        torch.from_numpy(yte.astype(np.int64)),
        FASHION_MNIST_CLASSES,
    )


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python format is a pickle, and pickle.load runs whatever callable a file names; a
    crafted batch in --data would run code at training time. A CIFAR batch needs only numpy's
    array reconstruction (plus the containers pickle builds natively), so that is all we allow."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("copy_reg", "_reconstructor"),
            ("copyreg", "_reconstructor"),
            ("__builtin__", "object"),
            ("builtins", "object"),
            ("_codecs", "encode"),  # how protocol 2 written by Python 3 stores bytes (a pure function)
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR batch holds only arrays and lists")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise DataError(f"missing {path}. {_HOW_TO_GET}")
    with path.open("rb") as f:
        try:
            obj = _CifarUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as exc:
            raise DataError(f"{path} is not a plain CIFAR python pickle: {exc}") from exc
    if not isinstance(obj, dict) or (b"data" not in obj and path.name not in ("meta", "batches.meta")):
        raise DataError(f"{path} is not a CIFAR python pickle. {_HOW_TO_GET}")
    return obj


def _cifar_arrays(batches: list[dict[bytes, Any]], label_key: bytes) -> tuple[Tensor, Tensor]:
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return torch.from_numpy(data), torch.from_numpy(labels)


def _load_cifar10(d: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[str, ...]]:
    xtr, ytr = _cifar_arrays([_unpickle(d / f"data_batch_{i}") for i in range(1, 6)], b"labels")
    xte, yte = _cifar_arrays([_unpickle(d / "test_batch")], b"labels")
    names = tuple(n.decode() for n in _unpickle(d / "batches.meta")[b"label_names"])
    return xtr, ytr, xte, yte, names


def _load_cifar100(d: Path) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[str, ...]]:
    xtr, ytr = _cifar_arrays([_unpickle(d / "train")], b"fine_labels")
    xte, yte = _cifar_arrays([_unpickle(d / "test")], b"fine_labels")
    names = tuple(n.decode() for n in _unpickle(d / "meta")[b"fine_label_names"])
    return xtr, ytr, xte, yte, names


def _load_imagefolder(d: Path, image_size: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[str, ...]]:
    from PIL import Image

    classes = sorted(p.name for p in (d / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{d / 'train'} has no class folders. {_HOW_TO_GET}")
    index = {c: i for i, c in enumerate(classes)}

    def read(split: str) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        mode: str | None = None
        for cls_dir in sorted(p for p in (d / split).iterdir() if p.is_dir()):
            if cls_dir.name not in index:
                raise DataError(f"{cls_dir}: class {cls_dir.name!r} is not in {d / 'train'}")
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() not in _IMAGE_EXTS:
                    continue
                with Image.open(f) as opened:
                    if mode is None:  # the first image decides grayscale vs RGB
                        mode = "L" if opened.mode in ("L", "1", "I;16", "I") else "RGB"
                    im = opened.convert(mode)
                    if image_size is not None and im.size != (image_size, image_size):
                        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
                images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
                labels.append(index[cls_dir.name])
        if not images:
            raise DataError(f"{d / split} holds no images. {_HOW_TO_GET}")
        if len({a.shape for a in images}) != 1:
            raise DataError(f"{d / split}: images differ in size; pass image_size to resize them")
        return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)

    xtr, ytr = read("train")
    xte, yte = read("test")
    return xtr, ytr, xte, yte, tuple(classes)


def detect_dataset(data_dir: str | Path) -> tuple[str, Path]:
    """(kind, directory holding the files); looks one level into cifar-10-batches-py / cifar-100-python."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory {d} does not exist. {_HOW_TO_GET}")
    if _find(d, "train-images-idx3-ubyte"):
        return "fashion-mnist", d
    for sub in (d, d / "cifar-10-batches-py"):
        if (sub / "data_batch_1").is_file():
            return "cifar10", sub
    for sub in (d, d / "cifar-100-python"):
        if (sub / "train").is_file() and (sub / "meta").is_file():
            return "cifar100", sub
    if (d / "train").is_dir() and (d / "test").is_dir():
        return "imagefolder", d
    raise DataError(f"cannot recognise a dataset in {d}. {_HOW_TO_GET}")


def load_arrays(
    data_dir: str | Path, dataset: str | None = None, image_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[str, ...], str]:
    """Raw uint8 train/test arrays, class names and the dataset kind."""
    kind, d = detect_dataset(data_dir)
    if dataset is not None and dataset != kind:
        raise DataError(f"{data_dir} holds {kind}, not {dataset}")
    if kind == "fashion-mnist":
        out = _load_fashion_mnist(d)
    elif kind == "cifar10":
        out = _load_cifar10(d)
    elif kind == "cifar100":
        out = _load_cifar100(d)
    else:
        out = _load_imagefolder(d, image_size)
    xtr, ytr, xte, yte, names = out
    if image_size is not None and xtr.shape[-1] != image_size:
        xtr, xte = _resize(xtr, image_size), _resize(xte, image_size)
    return xtr, ytr, xte, yte, names, kind


def _resize(x: Tensor, size: int) -> Tensor:
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def heldout_indices(n: int, heldout_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train indices, held-out indices): a seeded permutation of range(n), sorted for readability."""
    if not 0 <= heldout_size < n:
        raise DataError(f"held-out size {heldout_size} must be in [0, {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[heldout_size:].sort().values, perm[:heldout_size].sort().values


def load_splits(
    data_dir: str | Path,
    *,
    dataset: str | None = None,
    heldout_size: int = 5000,
    seed: int = 0,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    augment: str = "crop_flip",
    crop_padding: int | None = None,
) -> Splits:
    """Train (augmented), held-out and test (eval transform) splits of the dataset in `data_dir`."""
    xtr, ytr, xte, yte, names, kind = load_arrays(data_dir, dataset, image_size)
    default_mean, default_std = _DEFAULT_NORM.get(kind, ((0.5,) * xtr.shape[1], (0.25,) * xtr.shape[1]))
    mean = tuple(mean) if mean is not None else default_mean
    std = tuple(std) if std is not None else default_std
    if len(mean) != xtr.shape[1]:
        raise DataError(f"mean/std have {len(mean)} channels but {data_dir} images have {xtr.shape[1]}")
    eval_t = EvalTransform(mean, std)
    if augment == "crop_flip":
        pad = crop_padding if crop_padding is not None else (2 if kind == "fashion-mnist" else 4)
        train_t: EvalTransform = TrainTransform(mean, std, padding=pad, flip=True)
    else:
        train_t = eval_t
    tr_idx, ho_idx = heldout_indices(len(ytr), heldout_size, seed)
    return Splits(
        train=ArrayDataset(xtr[tr_idx], ytr[tr_idx], train_t),
        heldout=ArrayDataset(xtr[ho_idx], ytr[ho_idx], eval_t),
        test=ArrayDataset(xte, yte, eval_t),
        class_names=names,
        dataset=kind,
        heldout_indices=tuple(int(i) for i in ho_idx),
    )


def write_split_json(path: str | Path, splits: Splits, data_dir: str | Path, seed: int) -> None:
    record = splits.split_record(data_dir, seed)
    record["heldout_indices"] = list(splits.heldout_indices)
    Path(path).write_text(json.dumps(record))
