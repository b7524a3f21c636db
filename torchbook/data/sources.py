"""The book's datasets: where each comes from (URL and sha256) and a small loader for each.

Every file goes through `torchbook.data.download.fetch` (cache, `$TORCHBOOK_MIRROR`, resume, checksum). Add a
dataset by adding its `RemoteFile` here and a `load_<name>()` function.
"""

from __future__ import annotations

import tarfile

import pandas as pd

from torchbook.data.download import RemoteFile, cache_dir, fetch

HOUSING = RemoteFile(
    "https://github.com/ageron/data/raw/main/housing.tgz",
    "354f441b3af4eb54e07818501dafc9b0865162d85a24769d754238acedc82ae1",
    offline="set $TORCHBOOK_MIRROR to a folder holding housing.tgz (e.g. the shared data mirror)",
)
HOUSING_SOURCE = "California housing, 1990 census (Pace and Barry, 1997), the book's housing.tgz"


def extract(remote: RemoteFile, member: str) -> str:
    """Extract one member of a fetched tar archive into the cache (once) and return its path."""
    archive = fetch(remote)
    target = cache_dir() / archive.stem / member
    if not target.exists():
        with tarfile.open(archive) as tar:
            tar.extract(member, path=cache_dir() / archive.stem, filter="data")
    return str(target)


def load_housing() -> pd.DataFrame:
    """The book's California housing table: 20,640 districts, 10 columns including ocean_proximity."""
    return pd.read_csv(extract(HOUSING, "housing/housing.csv"))
