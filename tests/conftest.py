"""Shared test set-up: the book's datasets come from the offline mirror; the cache and torchbook's home go to
temporary folders; under CI=true a test that skips fails, unless it is marked `optional_data`.

A test may skip locally when data or a package it needs is missing (its reason says how to get it). CI installs
everything (`make install`, `make system-deps`), so there a skip means a missing install step and fails the run.
Only a test marked `@pytest.mark.optional_data("why it cannot always be had")` may skip under CI, for data that
cannot be had offline at all (a download with no offline copy).
"""

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
    """A fresh download cache for the session, so tests never depend on what a user's cache holds (the cache only
    holds what can be made again; it is shared by the session's tests to keep downloads and conversions once)."""
    cache = tmp_path_factory.mktemp("torchbook-cache")
    os.environ["TORCHBOOK_CACHE"] = str(cache)
    return cache


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh `$TORCHBOOK_HOME` (knowledge bases, conversations, memory, keys) for every test; the mirror is the
    shared offline data or nothing, never a user's own folder."""
    home = tmp_path_factory.mktemp("torchbook-home")
    monkeypatch.setenv("TORCHBOOK_HOME", str(home))
    if SHARED_DATA.is_dir() and os.environ.get("TORCHBOOK_MIRROR") != str(SHARED_DATA):
        monkeypatch.setenv("TORCHBOOK_MIRROR", str(SHARED_DATA))
    return home


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "optional_data(reason): may skip even under CI=true (data not obtainable "
                                       "offline); every other skip fails under CI")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI", "").lower() == "true" and not hasattr(report, "wasxfail") \
            and item.get_closest_marker("optional_data") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"unexpected skip under CI=true: {reason}\nCI installs everything the tests need; install "
                           "it in .ci/run / make system-deps, or mark the test optional_data(reason) if it cannot "
                           "be had offline.")


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
