"""Write a handful of real Fashion-MNIST *test* images as PNG for the quick-start and tests.

One image per class (the first of each class in the test split), named
`<test index>_<class slug>.png`, plus `labels.json` mapping file name -> label index/name.
Only gzip + numpy + Pillow: runs in the serving environment.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path("examples/images"))
    args = parser.parse_args()
    images = read_idx(args.data / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(args.data / "t10k-labels-idx1-ubyte.gz")
    args.out.mkdir(parents=True, exist_ok=True)
    index: dict[str, dict[str, object]] = {}
    for label, name in enumerate(CLASS_NAMES):
        i = int(np.flatnonzero(labels == label)[0])
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        file_name = f"{i:05d}_{slug}.png"
        Image.fromarray(images[i], mode="L").save(args.out / file_name, optimize=True)
        index[file_name] = {"label": label, "class_name": name, "test_index": i}
    (args.out / "labels.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {len(index)} images to {args.out}")


if __name__ == "__main__":
    main()
