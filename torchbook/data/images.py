"""Small image datasets: Fashion-MNIST (the book's, downloaded) and scikit-learn's digits (offline)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass

import numpy as np

from torchbook.data.download import RemoteFile, fetch

_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_OFFLINE = "data=digits (scikit-learn's bundled 8x8 digits)"
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


def read_idx(path: str) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): magic, dimensions, then unsigned bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    n_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(shape)


def load_fashion_mnist() -> ImageData:
    arrays = {key: read_idx(str(fetch(remote))) for key, remote in FASHION_MNIST.items()}
    return ImageData(
        name="fashion-mnist",
        source="Fashion-MNIST (Zalando Research), " + _FASHION,
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
