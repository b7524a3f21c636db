"""Fashion-MNIST from Debian's package (the offline source): the real idx files, checksummed."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_debian_fashion

from torchbook.data import images
from torchbook.errors import DataUnavailable


@needs_debian_fashion
def test_fashion_mnist_loads_from_debians_package_with_the_books_shapes() -> None:
    data = images.load_fashion_mnist()
    assert "dataset-fashion-mnist" in data.source
    assert data.images.shape == (60_000, 28, 28) and data.test_images is not None
    assert data.test_images.shape == (10_000, 28, 28)
    assert data.images.dtype == np.float32 and 0.0 <= data.images.min() and data.images.max() == 1.0
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    assert np.bincount(data.labels).tolist() == [6000] * 10
    assert data.test_labels is not None and np.bincount(data.test_labels).tolist() == [1000] * 10
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"


@needs_debian_fashion
def test_a_damaged_idx_file_is_refused_by_its_decompressed_checksum(tmp_path: Path) -> None:
    original = images.DEBIAN_FASHION_DIR / "train-labels-idx1-ubyte.gz"
    labels = images.read_idx(original, images.DEBIAN_FASHION_IDX_SHA256["train_labels"])
    assert labels.shape == (60_000,)
    damaged = tmp_path / original.name
    with gzip.open(original, "rb") as f:
        data = bytearray(f.read())
    data[-1] ^= 1
    with gzip.open(damaged, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(DataUnavailable, match="decompressed sha256"):
        images.read_idx(damaged, images.DEBIAN_FASHION_IDX_SHA256["train_labels"])


def test_without_debians_package_the_canonical_download_is_used_and_its_error_names_both_alternatives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "DEBIAN_FASHION_DIR", tmp_path / "absent")
    monkeypatch.setenv("TORCHBOOK_MIRROR", str(tmp_path))
    monkeypatch.setenv("TORCHBOOK_CACHE", str(tmp_path / "cache"))
    # An unreachable address on this machine (the discard port, closed), never the network.
    local = {key: dataclasses.replace(remote, url="http://127.0.0.1:9/" + remote.name)
             for key, remote in images.FASHION_MNIST.items()}
    monkeypatch.setattr(images, "FASHION_MNIST", local)
    with pytest.raises(DataUnavailable, match="dataset-fashion-mnist.*data=digits"):
        images.load_fashion_mnist()
    assert not list((tmp_path / "cache").glob("*.gz"))  # nothing half-written left in the cache
