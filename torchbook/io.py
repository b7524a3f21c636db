"""Atomic file writes: a file is either its old self or its complete new self, never half-written."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# Folders this process must not write to: a run folder on a process other than rank 0 of a distributed run
# (only rank 0 writes run files; see RunDir.start). Writes below them are skipped.
_READ_ONLY_FOLDERS: set[Path] = set()


def is_main_process() -> bool:
    """False on every process but rank 0 of a distributed run (torchrun sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def make_read_only(folder: str | Path) -> None:
    _READ_ONLY_FOLDERS.add(Path(folder).resolve())


def is_read_only(path: str | Path) -> bool:
    if not _READ_ONLY_FOLDERS:
        return False
    resolved = Path(path).resolve()
    return any(resolved == f or f in resolved.parents for f in _READ_ONLY_FOLDERS)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files are created as `open()` would create them: 0666 less the umask (a temporary file is 0600 by default).
FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it, then rename it over `path`. The file gets the
    mode a plain `open()` would give it (the umask's)."""
    path = Path(path)
    if is_read_only(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy and torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def to_jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))
