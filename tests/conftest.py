"""Shared test set-up: the book's datasets come from the offline mirror; caches and runs go to temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # With one test worker per core, one thread per worker gives the most throughput (no oversubscription).
    import torch

    torch.set_num_threads(1)
if not os.environ.get("TORCHBOOK_MIRROR") and SHARED_DATA.is_dir():
    os.environ["TORCHBOOK_MIRROR"] = str(SHARED_DATA)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh download cache for the session, so tests never depend on what a user's cache holds."""
    cache = tmp_path_factory.mktemp("torchbook-cache")
    os.environ["TORCHBOOK_CACHE"] = str(cache)
    return cache


def mirror_has(name: str) -> bool:
    mirror = os.environ.get("TORCHBOOK_MIRROR")
    return bool(mirror) and (Path(mirror) / name).is_file()


needs_housing = pytest.mark.skipif(not mirror_has("housing.tgz"), reason="the book's housing.tgz is not in $TORCHBOOK_MIRROR")
needs_debian_fashion = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (make system-deps)",
)


@pytest.fixture(scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Small models on a shared machine: one thread avoids oversubscribing the cores (restored afterwards).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
