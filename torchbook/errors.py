"""Errors that reach the user. At the boundary (CLI, HTTP, file loading) they print as one clear line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TorchbookError(Exception):
    """Base class: a problem the user can fix. The message says what was wrong and what is accepted; `param` names
    the setting at fault (a function argument or config key), so that a front end (the CLI, the HTTP server) can
    name its own flag or field for it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UserInputError(TorchbookError):
    """A wrong name, key, value or file given by the user."""


class RunExists(UserInputError):
    """A run folder already holds another run (another recipe or config)."""


class RunFinished(UserInputError):
    """A run folder holds a finished run (its report.md is written): there is nothing to resume."""


class DataUnavailable(TorchbookError):
    """A dataset or file could not be obtained (offline, missing, checksum mismatch)."""


class CheckpointError(TorchbookError):
    """A checkpoint or run folder is missing, corrupt or of the wrong kind."""


class TrainingDiverged(TorchbookError):
    """The loss became NaN or infinite."""


def closest_first(name: str, accepted: Iterable[str]) -> list[str]:
    """The accepted names, the ones closest to `name` first (for 'did you mean' messages)."""
    accepted = sorted(set(accepted))
    if not accepted:
        return []
    close = difflib.get_close_matches(name, accepted, n=len(accepted), cutoff=0.0)
    return close or accepted


def unknown(kind: str, name: str, accepted: Iterable[str], limit: int | None = None) -> UserInputError:
    """An error for an unknown name: 'unknown recipe 'x'; accepted: a, b, c' with the closest match first
    (only the `limit` closest when there are many)."""
    names = closest_first(name, accepted)
    if limit is not None and len(names) > limit:
        names = [*names[:limit], f"... ({len(names) - limit} more)"]
    return UserInputError(f"unknown {kind} {name!r}; accepted: {', '.join(names) or '(none yet)'}")
