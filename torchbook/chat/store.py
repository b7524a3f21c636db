"""The chat's SQLite database (conversations, prompts, memory) under `$TORCHBOOK_HOME/chat/chat.sqlite`.

One connection per `Database`, shared by threads under a lock (the HTTP server's workers and the engine's), in
WAL mode (readers never wait for a writer; a crash loses at most the transaction in flight) with foreign keys on
and a busy timeout, so two processes (a terminal chat and a server) can use the same file. Every write goes
through `transaction()`, which commits all of it or none of it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torchbook.paths import home

BUSY_TIMEOUT_S = 10.0


def default_path() -> Path:
    return home() / "chat" / "chat.sqlite"


class Database:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False,
                                     isolation_level=None)  # autocommit outside our explicit transactions
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA synchronous=NORMAL")

    _open: dict[str, Database] = {}
    _open_lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path | None = None) -> Database:
        """The database at `path` (default: `default_path()`), one shared object per file in this process."""
        resolved = str(Path(path).expanduser().resolve()) if path not in (None, ":memory:") else (
            ":memory:" if path == ":memory:" else str(default_path()))
        if resolved == ":memory:":
            return cls(resolved)
        with cls._open_lock:
            db = cls._open.get(resolved)
            if db is None or not Path(resolved).exists():
                db = cls._open[resolved] = cls(resolved)
            return db

    def journal_mode(self) -> str:
        return str(self.query("PRAGMA journal_mode")[0][0])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """`with db.transaction() as conn:` every statement inside commits together, or none does (on an error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def script(self, sql: str) -> None:
        with self._lock:
            self._conn.executescript(sql)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        with self._open_lock:
            for key, db in list(self._open.items()):
                if db is self:
                    del self._open[key]
