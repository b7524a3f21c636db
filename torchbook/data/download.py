"""The one download helper for every remote file: URL, sha256, cache, offline mirror, resume, atomic rename.

Look-up order for `fetch(RemoteFile(...))`:

1. the cache, `$TORCHBOOK_CACHE` (default `~/.cache/torchbook`), if the file there has the right checksum;
2. the offline mirror `$TORCHBOOK_MIRROR` (a folder, e.g. `../shared/data`), copied into the cache once its
   checksum matches;
3. the URL, downloaded to `<file>.part` (resumed with an HTTP Range request if a part exists), checked, then
   renamed into place, so a killed download never leaves a file that looks complete.

When all three fail, `DataUnavailable` says why and names the offline alternative.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from torchbook import paths
from torchbook.errors import DataUnavailable

log = logging.getLogger(__name__)
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """A file on the web with its checksum. `offline` tells the user what to use when it cannot be reached."""

    url: str
    sha256: str
    filename: str = ""
    offline: str = ""

    @property
    def name(self) -> str:
        return self.filename or self.url.rstrip("/").rsplit("/", 1)[-1]


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_checked(src: Path, dest: Path, sha256: str) -> bool:
    if sha256 and sha256_of(src) != sha256:  # an empty sha256: none published (see `fetch`)
        log.warning("ignoring %s: its sha256 does not match the expected %s...", src, sha256[:12])
        return False
    tmp = dest.with_name(dest.name + ".copy")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return True


def _download(remote: RemoteFile, dest: Path, timeout: float) -> None:
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(remote.url, headers={"User-Agent": "torchbook"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if offset and response.status != 206:  # the server ignored the range: start over
            offset = 0
        total = int(response.headers.get("Content-Length") or 0) + offset
        with (
            open(part, "ab" if offset else "wb") as f,
            tqdm(total=total or None, initial=offset, unit="B", unit_scale=True, desc=remote.name, disable=None) as bar,
        ):
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    actual = sha256_of(part)
    if not remote.sha256:
        log.warning("%s has no published checksum; its sha256 is %s", remote.name, actual)
    elif actual != remote.sha256:
        part.unlink()
        raise DataUnavailable(
            f"downloaded {remote.url} but its sha256 is {actual[:12]}..., expected {remote.sha256[:12]}...; "
            "the file changed upstream or the download was damaged (deleted, try again)"
        )
    os.replace(part, dest)


def fetch(remote: RemoteFile, timeout: float = 30.0) -> Path:
    """The local path of `remote`, from the cache, the mirror or the web (see the module docstring)."""
    cache = paths.cache()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / remote.name
    dest.parent.mkdir(parents=True, exist_ok=True)  # a name may hold a folder, as the mirror does (self-instruct/...)
    if dest.exists():
        if not remote.sha256 or sha256_of(dest) == remote.sha256:  # "": no published checksum to check against
            return dest
        dest.unlink()  # stale or damaged: fetch again
    mirror = paths.mirror()
    if mirror is not None and (mirror / remote.name).is_file() and _copy_checked(mirror / remote.name, dest, remote.sha256):
        return dest
    try:
        _download(remote, dest, timeout)
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        hint = f" Offline alternative: {remote.offline}." if remote.offline else ""
        where = f" (also looked in $TORCHBOOK_MIRROR={mirror})" if mirror else " (set $TORCHBOOK_MIRROR to a folder holding it)"
        raise DataUnavailable(f"cannot download {remote.url}: {reason}{where}.{hint}") from None
    return dest
