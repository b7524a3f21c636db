"""Small image datasets: Fashion-MNIST (the book's: downloaded, or Debian's offline copy) and scikit-learn's digits."""

from __future__ import annotations

import gzip
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch.utils.data import Dataset

from torchbook.data.download import RemoteFile, fetch
from torchbook.data.splits import split_indices
from torchbook.errors import DataUnavailable

log = logging.getLogger(__name__)

_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_OFFLINE = ("Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
            "or data=digits (scikit-learn's bundled 8x8 digits)")
# Debian's package `dataset-fashion-mnist` installs the original idx files here. Its .gz files were recompressed
# (a few bytes differ from the canonical downloads), so what is pinned is the sha256 of the decompressed idx bytes.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_FASHION_IDX_SHA256 = {
    "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",  # 47,040,016 bytes
    "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",  # 60,008 bytes
    "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",  # 7,840,016 bytes
    "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",  # 10,008 bytes
}
FASHION_MNIST = {
    "train_images": RemoteFile(_FASHION + "train-images-idx3-ubyte.gz",
                               "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", offline=_OFFLINE),
    "train_labels": RemoteFile(_FASHION + "train-labels-idx1-ubyte.gz",
                               "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", offline=_OFFLINE),
    "test_images": RemoteFile(_FASHION + "t10k-images-idx3-ubyte.gz",
                              "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", offline=_OFFLINE),
    "test_labels": RemoteFile(_FASHION + "t10k-labels-idx1-ubyte.gz",
                              "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", offline=_OFFLINE),
}
BOOK_VAL_SIZE = 5_000  # the book's random_split(train_and_valid_data, [55_000, 5_000]) after torch.manual_seed(42)
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class ImageData:
    """Images as float32 in [0, 1], shape (N, H, W); labels int64; an official test split if the source has one."""

    name: str
    source: str
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None


def read_idx(path: str | Path, sha256: str = "") -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): magic, dimensions, then unsigned bytes. With `sha256`, the
    decompressed bytes must have that checksum."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise DataUnavailable(f"{path}: its decompressed sha256 is not the expected {sha256[:12]}... (damaged or "
                              "another version); reinstall the package or delete the file")
    n_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(shape)


def _debian_fashion_mnist() -> dict[str, np.ndarray] | None:
    """Debian's copy of Fashion-MNIST, checked against the pinned checksums, or None when it is not installed."""
    paths = {key: DEBIAN_FASHION_DIR / remote.name for key, remote in FASHION_MNIST.items()}
    if not all(path.is_file() for path in paths.values()):
        return None
    return {key: read_idx(path, DEBIAN_FASHION_IDX_SHA256[key]) for key, path in paths.items()}


def load_fashion_mnist() -> ImageData:
    """Fashion-MNIST's 60,000 training and 10,000 test images: Debian's installed copy when present (the same
    idx files, checksummed), else the canonical download through `fetch` (cache, mirror, checksum)."""
    arrays = _debian_fashion_mnist()
    if arrays is not None:
        source = f"Fashion-MNIST (Zalando Research), Debian's dataset-fashion-mnist ({DEBIAN_FASHION_DIR})"
        log.debug("Fashion-MNIST from %s", DEBIAN_FASHION_DIR)
    else:
        arrays = {key: read_idx(fetch(remote)) for key, remote in FASHION_MNIST.items()}
        source = "Fashion-MNIST (Zalando Research), " + _FASHION
    return ImageData(
        name="fashion-mnist",
        source=source,
        images=arrays["train_images"].astype(np.float32) / 255.0,
        labels=arrays["train_labels"].astype(np.int64),
        classes=FASHION_CLASSES,
        test_images=arrays["test_images"].astype(np.float32) / 255.0,
        test_labels=arrays["test_labels"].astype(np.int64),
    )


def load_digits() -> ImageData:
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    return ImageData(
        name="digits",
        source="scikit-learn's bundled digits (UCI optical recognition of handwritten digits, 1,797 8x8 images)",
        images=(digits.images / 16.0).astype(np.float32),
        labels=digits.target.astype(np.int64),
        classes=[str(d) for d in range(10)],
    )


IMAGE_DATASETS = {"fashion-mnist": load_fashion_mnist, "digits": load_digits}


def book_split(n: int, seed: int) -> dict[str, np.ndarray]:
    """Chapter 10's split of the training images: `random_split` into n - 5,000 training and 5,000 validation
    images with a generator seeded like the book's `torch.manual_seed(42)` (same permutation, same indices)."""
    generator = torch.Generator().manual_seed(seed)
    indices = cast("Dataset[int]", range(n))  # random_split only needs len(); its subsets hold the indices
    train, val = torch.utils.data.random_split(indices, [n - BOOK_VAL_SIZE, BOOK_VAL_SIZE], generator=generator)
    return {"train": np.asarray(train.indices, dtype=np.int64), "val": np.asarray(val.indices, dtype=np.int64)}


def image_split(data: ImageData, seed: int, limit: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The book's split when the source has a test set (Fashion-MNIST: `book_split` of the training images, the
    official 10,000 test), else a stratified 65/15/20 one (digits); `limit` keeps only the first training
    images. Returns the split's indices and the test images and labels."""
    if data.test_images is not None and data.test_labels is not None:
        splits = {**book_split(len(data.images), seed), "test": np.arange(len(data.test_images))}
        test_x, test_y = data.test_images, data.test_labels
    else:
        splits = split_indices(len(data.images), val=0.15, test=0.20, seed=seed, stratify=data.labels)
        test_x, test_y = data.images[splits["test"]], data.labels[splits["test"]]
    if limit:
        splits["train"] = splits["train"][:limit]
    return splits, test_x, test_y


def standard_split(data: ImageData, seed: int) -> dict[str, np.ndarray]:
    """`image_split`'s indices alone (all the training images): the book's split of Fashion-MNIST ("test" indexes
    `data.test_images`), else a stratified 65/15/20 split ("test" indexes `data.images`)."""
    return image_split(data, seed)[0]


def test_arrays(data: ImageData, splits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The test images and labels of `standard_split`."""
    if data.test_images is not None and data.test_labels is not None:
        return data.test_images, data.test_labels
    return data.images[splits["test"]], data.labels[splits["test"]]
