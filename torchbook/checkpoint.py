"""Checkpoints: atomic, checksummed, pruned; a corrupt or truncated one is reported and the previous one used.

Each checkpoint is `step-<N>.pt` (written to a temporary file, fsynced, renamed) and then `step-<N>.sha256`.
A checkpoint counts only when its checksum file exists and matches, so a process killed at any moment (even
in the middle of writing) leaves either a complete checkpoint or one that is skipped on resume.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
from pathlib import Path
from typing import Any

import torch

from torchbook.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

# Fault injection for the resume tests: kill this process half-way through writing the checkpoint of this step.
CRASH_ENV = "TORCHBOOK_CRASH_DURING_CHECKPOINT"


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:09d}.pt"


def _write_payload(f: Any, data: bytes, step: int) -> None:
    if os.environ.get(CRASH_ENV) == str(step):
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    f.write(data)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` as the checkpoint of optimizer step `step`; keep only the newest `keep` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(folder, step)
    atomic_write(path, lambda f: _write_payload(f, data, step))
    atomic_write_text(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest() + "\n")
    for old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files, newest first (by step)."""
    if not folder.is_dir():
        return []
    return sorted(folder.glob("step-*.pt"), reverse=True)


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    digest_file = path.with_suffix(".sha256")
    if not digest_file.exists():
        return "its checksum file is missing (the write did not finish)"
    expected = digest_file.read_text().strip()
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        return f"its sha256 {actual[:12]}... does not match the recorded {expected[:12]}... (corrupt or truncated)"
    return None


def load_latest(folder: Path, map_location: Any = "cpu") -> tuple[dict[str, Any] | None, list[str]]:
    """The newest intact checkpoint's state (or None) and warnings about the damaged ones skipped on the way."""
    warnings: list[str] = []
    for path in list_checkpoints(folder):
        problem = verify(path)
        if problem is None:
            try:
                return torch.load(path, map_location=map_location, weights_only=False), warnings
            except Exception as e:  # torch.load raises many kinds on damaged data
                problem = f"it cannot be read ({type(e).__name__}: {e})"
        warnings.append(f"skipping checkpoint {path}: {problem}")
        log.warning(warnings[-1])
    return None, warnings
