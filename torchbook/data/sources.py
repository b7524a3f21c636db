"""The book's datasets: where each comes from (URL and sha256) and a small loader for each.

Every file goes through `torchbook.data.download.fetch` (cache, `$TORCHBOOK_MIRROR`, resume, checksum). Add a
dataset by adding its `RemoteFile` here and a `load_<name>()` function.
"""

from __future__ import annotations

import tarfile

import numpy as np
import pandas as pd

from torchbook import paths
from torchbook.data.download import RemoteFile, fetch
from torchbook.data.images import read_idx

HOUSING = RemoteFile(
    "https://github.com/ageron/data/raw/main/housing.tgz",
    "354f441b3af4eb54e07818501dafc9b0865162d85a24769d754238acedc82ae1",
    offline="set $TORCHBOOK_MIRROR to a folder holding housing.tgz (e.g. the shared data mirror)",
)
HOUSING_SOURCE = "California housing, 1990 census (Pace and Barry, 1997), the book's housing.tgz"


def extract(remote: RemoteFile, member: str) -> str:
    """Extract one member of a fetched tar archive into the cache (once) and return its path."""
    archive = fetch(remote)
    target = paths.cache() / archive.stem / member
    if not target.exists():
        with tarfile.open(archive) as tar:
            tar.extract(member, path=paths.cache() / archive.stem, filter="data")
    return str(target)


def load_housing() -> pd.DataFrame:
    """The book's California housing table: 20,640 districts, 10 columns including ocean_proximity."""
    return pd.read_csv(extract(HOUSING, "housing/housing.csv"))


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_MNIST_OFFLINE = "data=digits (scikit-learn's bundled 8x8 digits)"
# The original IDX files (LeCun, Cortes and Burges), saved under mnist-* names so they never collide with
# Fashion-MNIST's files of the same names in the cache. Same images and order as OpenML's mnist_784.
MNIST = {
    key: RemoteFile(_MNIST_URL + name, sha256, filename="mnist-" + name, offline=_MNIST_OFFLINE)
    for key, name, sha256 in (
        ("train_images", "train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        ("train_labels", "train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        ("test_images", "t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        ("test_labels", "t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    )
}
MNIST_SOURCE = "MNIST (LeCun, Cortes and Burges), 70,000 28x28 digits, the book's mnist_784: first 60,000 train"


def load_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST as the book uses it: flat 784-pixel rows in 0..255 (float64) and string-free int labels, 60k / 10k."""
    arrays = {key: read_idx(str(fetch(remote))) for key, remote in MNIST.items()}
    return (arrays["train_images"].reshape(-1, 784).astype(np.float64), arrays["train_labels"].astype(np.int64),
            arrays["test_images"].reshape(-1, 784).astype(np.float64), arrays["test_labels"].astype(np.int64))


SHAKESPEARE = RemoteFile(
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",  # homl.info/shakespeare
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    filename="tinyshakespeare.txt",  # the URL's own name, input.txt, says nothing in a shared cache
    offline="set $TORCHBOOK_MIRROR to a folder holding tinyshakespeare.txt (e.g. the shared data mirror)",
)
SHAKESPEARE_SOURCE = ("tiny Shakespeare (Karpathy's char-rnn input.txt, 1,115,394 characters of Shakespeare's plays), "
                      "the book's homl.info/shakespeare")


def load_shakespeare() -> str:
    """The book's Shakespearean text (chapter 14) as one string, exactly as published (not lowercased)."""
    return fetch(SHAKESPEARE).read_text(encoding="utf-8")


DIGITS_SOURCE = "scikit-learn's bundled digits (UCI optical recognition of handwritten digits, 1,797 8x8 images)"


def load_digits_split(test_size: float = 0.2, seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The offline stand-in for MNIST: scikit-learn's digits (pixels 0..16), split stratified train / test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
    return x_train, y_train, x_test, y_test
