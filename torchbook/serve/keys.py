"""API keys for `torchbook serve` (chapter 15's deployment): created once, shown once, stored only as hashes.

A key is `tb-` + 32 random bytes (url-safe base64). The file `paths.home()/serve/api_keys.json` (mode 0600) keeps
each key's id, name, creation time, optional rate limit (requests per minute) and the SHA-256 of the key, never the
key itself: a 256-bit random secret needs no slow hash, and SHA-256 makes the file useless to whoever reads it.
`RateLimiter` is a token bucket per key: `limit` requests per minute, at most `limit` at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from torchbook import paths
from torchbook.errors import UserInputError
from torchbook.io import atomic_write_text

PREFIX = "tb-"


def keys_file() -> Path:
    return paths.home() / "serve" / "api_keys.json"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class KeyRecord:
    id: str
    name: str
    sha256: str
    created: float
    rate_limit: int | None = None  # requests per minute (None: the server's default)


class KeyStore:
    """The hashed keys in `path` (default `keys_file()`)."""

    def __init__(self, path: Path | None = None):
        self.path = path or keys_file()

    def records(self) -> list[KeyRecord]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            return [KeyRecord(**r) for r in data["keys"]]
        except (ValueError, KeyError, TypeError) as e:
            raise UserInputError(f"{str(self.path)!r} is not a torchbook API key file ({e}); move it away",
                                 param="keys") from None

    def _write(self, records: list[KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"keys": [asdict(r) for r in records]}, indent=1))
        self.path.chmod(0o600)

    def add(self, name: str = "", rate_limit: int | None = None) -> tuple[KeyRecord, str]:
        """A new key: its record (stored) and the key itself (shown once, stored nowhere)."""
        if rate_limit is not None and rate_limit < 1:
            raise UserInputError(f"a key's rate limit must be at least 1 request per minute, got {rate_limit}",
                                 param="rate_limit")
        key = PREFIX + secrets.token_urlsafe(32)
        records = self.records()
        record = KeyRecord(f"key-{secrets.token_hex(4)}", name, digest(key), time.time(), rate_limit)
        self._write([*records, record])
        return record, key

    def revoke(self, key_id: str) -> None:
        records = self.records()
        kept = [r for r in records if r.id != key_id]
        if len(kept) == len(records):
            raise UserInputError(f"no API key {key_id!r}; the keys: {', '.join(r.id for r in records) or '(none)'}",
                                 param="key_id")
        self._write(kept)

    def check(self, key: str) -> KeyRecord | None:
        """The record of `key`, or None (constant-time comparison of the hashes)."""
        wanted = digest(key)
        found = None
        for record in self.records():
            if hmac.compare_digest(record.sha256, wanted):
                found = record
        return found


class RateLimiter:
    """A token bucket per name: `limit` requests per minute, refilled continuously."""

    def __init__(self) -> None:
        self.buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        self.lock = threading.Lock()

    def allow(self, name: str, limit: int) -> float:
        """0 when a request may go now (and takes a token), else the seconds until one may."""
        now = time.monotonic()
        with self.lock:
            tokens, at = self.buckets.get(name, (float(limit), now))
            tokens = min(float(limit), tokens + (now - at) * limit / 60.0)
            if tokens >= 1.0:
                self.buckets[name] = (tokens - 1.0, now)
                return 0.0
            self.buckets[name] = (tokens, now)
            return (1.0 - tokens) * 60.0 / limit
