"""Long-term memory (book chapter 15): facts about each user, kept in SQLite, the relevant ones recalled by similarity.

    memory = Memory.open()                           # $TORCHBOOK_HOME/chat/chat.sqlite
    memory.add("alice", "My dog is called Rex")      # -> Fact(id, user, text, created)
    memory.relevant("alice", "what is my pet's name?", k=3)   # [(Fact, similarity)], most similar first
    memory.facts("alice"); memory.delete("alice", fact_id)

Similarity: with an `embed` function (texts -> unit vectors; `Embedder.encode`, the knowledge base's sentence
embedder) each fact's vector is stored beside it and the cosine decides; without one, the cosine of word counts
(TF-IDF weighted over the user's facts), which finds only facts that share words with the question. Facts are
per user: one user never sees or deletes another's.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from torchbook.chat.store import Database
from torchbook.errors import UserInputError

Embed = Callable[[Sequence[str]], np.ndarray]
MAX_FACT_CHARS = 1000
WORD = re.compile(r"\w+", re.UNICODE)

SCHEMA = """
CREATE TABLE IF NOT EXISTS facts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    text TEXT NOT NULL,
    embedder TEXT,
    vector BLOB,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS facts_user ON facts(user);
"""


@dataclass(frozen=True)
class Fact:
    id: int
    user: str
    text: str
    created: float


def _words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def lexical_similarity(query: str, texts: Sequence[str]) -> list[float]:
    """Cosine similarity of TF-IDF word vectors (IDF over `texts`): the fallback without an embedder."""
    docs = [Counter(_words(t)) for t in texts]
    q = Counter(_words(query))
    n = len(docs)
    df = Counter(w for d in docs for w in d)

    def weight(counts: Counter[str]) -> dict[str, float]:
        return {w: c * (math.log((1 + n) / (1 + df[w])) + 1) for w, c in counts.items()}

    qv = weight(q)
    qn = math.sqrt(sum(v * v for v in qv.values())) or 1.0
    scores = []
    for d in docs:
        dv = weight(d)
        dn = math.sqrt(sum(v * v for v in dv.values())) or 1.0
        scores.append(sum(qv[w] * dv.get(w, 0.0) for w in qv) / (qn * dn))
    return scores


class Memory:
    """Facts per user (see the module docstring). `embed` and `embedder_name` go together: vectors made by one
    embedder are only compared with vectors of the same one (a fact stored without, or with another, is
    embedded again when recalled)."""

    def __init__(self, db: Database, embed: Embed | None = None, embedder_name: str | None = None):
        self.db = db
        self.embed = embed
        self.embedder_name = embedder_name or ("embedder" if embed else None)
        self.db.script(SCHEMA)

    @classmethod
    def open(cls, path: str | Path | None = None, embed: Embed | None = None,
             embedder_name: str | None = None) -> Memory:
        return cls(Database.open(path), embed, embedder_name)

    def _vector(self, text: str) -> bytes | None:
        if self.embed is None:
            return None
        return np.asarray(self.embed([text])[0], dtype=np.float32).tobytes()

    def add(self, user: str, text: str) -> Fact:
        text = " ".join(text.split())
        if not text:
            raise UserInputError("the fact is empty; say what to remember", param="fact")
        if len(text) > MAX_FACT_CHARS:
            raise UserInputError(f"the fact is {len(text)} characters; at most {MAX_FACT_CHARS}", param="fact")
        for fact in self.facts(user):  # the same fact twice is stored once
            if fact.text.lower() == text.lower():
                return fact
        now = time.time()
        with self.db.transaction() as conn:
            cursor = conn.execute("INSERT INTO facts(user, text, embedder, vector, created) VALUES (?, ?, ?, ?, ?)",
                                  (user, text, self.embedder_name, self._vector(text), now))
            return Fact(int(cursor.lastrowid or 0), user, text, now)

    def facts(self, user: str) -> list[Fact]:
        rows = self.db.query("SELECT id, user, text, created FROM facts WHERE user = ? ORDER BY id", (user,))
        return [Fact(*row) for row in rows]

    def delete(self, user: str, fact_id: int) -> bool:
        """Forget one of `user`'s facts; whether there was such a fact."""
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM facts WHERE user = ? AND id = ?", (user, int(fact_id))).rowcount > 0

    def clear(self, user: str) -> int:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM facts WHERE user = ?", (user,)).rowcount

    def relevant(self, user: str, query: str, k: int = 3, min_similarity: float = 0.3) -> list[tuple[Fact, float]]:
        """The user's `k` facts most similar to `query` (at least `min_similarity`), most similar first."""
        rows = self.db.query("SELECT id, user, text, created, embedder, vector FROM facts WHERE user = ?", (user,))
        if not rows or not query.strip():
            return []
        facts = [Fact(*row[:4]) for row in rows]
        if self.embed is None:
            scores = lexical_similarity(query, [f.text for f in facts])
        else:
            vectors = []
            for fact, row in zip(facts, rows):
                if row[4] == self.embedder_name and row[5] is not None:
                    vectors.append(np.frombuffer(row[5], dtype=np.float32))
                else:
                    vectors.append(np.asarray(self.embed([fact.text])[0], dtype=np.float32))
            q = np.asarray(self.embed([query])[0], dtype=np.float32)
            matrix = np.stack(vectors)
            norms = np.linalg.norm(matrix, axis=1) * (np.linalg.norm(q) or 1.0)
            scores = (matrix @ q / np.where(norms == 0, 1.0, norms)).tolist()
        ranked = sorted(zip(facts, scores), key=lambda fs: -fs[1])
        return [(f, float(s)) for f, s in ranked[:k] if s >= min_similarity]
