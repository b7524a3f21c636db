"""Where torchbook keeps things, defined once.

- `home()`: user state that must survive (knowledge bases, conversations, memory, API keys):
  `$TORCHBOOK_HOME`, default `~/.local/share/torchbook`.
- `cache()`: downloads and derived files that can be made again: `$TORCHBOOK_CACHE`, default `~/.cache/torchbook`.
- `mirror()`: an offline folder searched before any download (checksums still verified): `$TORCHBOOK_MIRROR`,
  or None.

Each is read from the environment at every call, so a test (or a user) can point them elsewhere at any time.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("TORCHBOOK_HOME") or Path.home() / ".local" / "share" / "torchbook")


def cache() -> Path:
    return Path(os.environ.get("TORCHBOOK_CACHE") or Path.home() / ".cache" / "torchbook")


def mirror() -> Path | None:
    value = os.environ.get("TORCHBOOK_MIRROR")
    return Path(value) if value else None
