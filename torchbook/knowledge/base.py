"""A knowledge base (chapter 15's retrieval-augmented generation): index documents, delete them, search them.

`KnowledgeBase.open(location, embedder)`: `location` is None (the base `default` under `$TORCHBOOK_HOME/knowledge`),
a name (`$TORCHBOOK_HOME/knowledge/NAME`), a folder (a LanceDB base there) or `postgresql://...` (PostgreSQL with
pgvector). The base records its embedder's name and dimension on first write; opening it with another embedder is
a `UserInputError` (vectors of two models cannot be compared).

`index(paths)`: .txt/.md/.html/.pdf files and folders (recursively). A file whose content hash is already stored
is skipped; a changed one has its chunks replaced in one commit; an unreadable or binary one is reported in
`IndexReport.unreadable` and skipped. Each file is committed on its own, so an interrupted run loses nothing that
was committed and the next run resumes where it stopped.

`search(query, k, filters, mode)`: hybrid retrieval (mode "hybrid"): the `candidates` best chunks by cosine
similarity of the embeddings and the `candidates` best by BM25 (bm25s over the stored chunks' text, restricted by
the same filters) are fused by reciprocal rank, score(d) = sum over the lists of 1 / (60 + rank) (Cormack et al.
2009); "vector" and "bm25" use one list alone. Every hit carries its source, chunk, line/page and a citation.

Vector search is exact below `stores.VECTOR_INDEX_MIN_ROWS` chunks; `index` builds an approximate index (LanceDB
IVF_HNSW_SQ, pgvector HNSW) when the base grows past it, and keeps it up to date after.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from torchbook.errors import UserInputError
from torchbook.knowledge.documents import SUFFIXES, UnreadableFile, chunk_text, content_hash, extract_text
from torchbook.knowledge.embedder import Embedder
from torchbook.knowledge.stores import LanceStore, PgStore, Store, where_clause
from torchbook.paths import home

log = logging.getLogger(__name__)

RRF_K = 60  # reciprocal rank fusion's constant (Cormack, Clarke and Buettcher 2009)
MODES = ("hybrid", "vector", "bm25")


def knowledge_home() -> Path:
    return home() / "knowledge"


def open_store(location: str | Path | None = None) -> Store:
    """The store at `location` (see the module docstring)."""
    text = str(location) if location is not None else "default"
    if text.startswith(("postgresql://", "postgres://")):
        return PgStore(text)
    path = Path(text)
    if len(path.parts) == 1 and not text.startswith("."):  # a bare name: a base under $TORCHBOOK_HOME
        path = knowledge_home() / text
    return LanceStore(path)


@dataclass
class Hit:
    """One search result: a chunk of a source, where it sits, and its fused score."""

    source: str
    chunk: int
    line: int
    page: int
    text: str
    score: float
    ranks: dict[str, int] = field(default_factory=dict)  # its rank (1 = best) in each list that found it

    @property
    def citation(self) -> str:
        return f"{self.source} p.{self.page}" if self.page else f"{self.source}:{self.line}"


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unchanged since the last index
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    chunks: int = 0  # chunks written

    def summary(self) -> str:
        return (f"{len(self.added)} added, {len(self.updated)} updated, {len(self.skipped)} unchanged, "
                f"{len(self.unreadable)} unreadable, {self.chunks} chunks written")


def document_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files to index: files given by name (any suffix: tried as text), and inside folders those with a known
    suffix; and the paths that do not exist."""
    files, missing = [], []
    for given in paths:
        path = Path(given).expanduser().resolve()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            missing.append((str(given), "no such file or folder"))
    return list(dict.fromkeys(files)), missing


class KnowledgeBase:
    def __init__(self, store: Store, embedder: Embedder, overlap: int = 32):
        self.store = store
        self.embedder = embedder
        self.overlap = overlap
        meta = store.read_meta()
        if meta is not None and (meta.get("embedder") != embedder.name or meta.get("dim") != embedder.dim):
            raise UserInputError(
                f"the knowledge base {store.location} was built with the embedder {meta.get('embedder')!r} "
                f"({meta.get('dim')} dimensions); {embedder.name!r} ({embedder.dim}) cannot search it: use that "
                "embedder or index into a new base", param="embedder")
        self._bm25: tuple[Any, list[str]] | None = None

    @classmethod
    def open(cls, location: str | Path | None = None, embedder: Embedder | None = None) -> KnowledgeBase:
        return cls(open_store(location), embedder or Embedder.load())

    def _remember_embedder(self) -> None:
        if self.store.read_meta() is None:
            self.store.write_meta({"embedder": self.embedder.name, "dim": self.embedder.dim,
                                   "max_tokens": self.embedder.max_tokens, "overlap": self.overlap})

    # -- ingestion --------------------------------------------------------------------------------------------
    def index(self, paths: Iterable[str | Path], progress: Callable[[str], None] | None = None) -> IndexReport:
        """Index files and folders (see the module docstring); what happened to each file."""
        paths = list(paths)
        files, missing = document_files(paths)
        if paths and len(missing) == len(paths):  # nothing given exists: a mistyped path, not a batch to report on
            raise UserInputError(f"{', '.join(repr(m[0]) for m in missing)}: no such file or folder; give files or "
                                 "folders to index (.txt, .md, .html, .pdf)")
        report = IndexReport(unreadable=list(missing))
        stored = self.store.sources()
        self._remember_embedder()
        for path in files:
            source = str(path)
            try:
                data = path.read_bytes()
            except OSError as e:
                report.unreadable.append((source, e.strerror or str(e)))
                continue
            digest = content_hash(data)
            if stored.get(source) == digest:
                report.skipped.append(source)
                continue
            try:
                text = extract_text(path, data)
            except UnreadableFile as e:
                report.unreadable.append((source, str(e)))
                continue
            chunks = chunk_text(text, self.embedder.tokenizer, self.embedder.max_tokens, self.overlap)
            if not chunks:
                report.unreadable.append((source, "no text"))
                continue
            vectors = self.embedder.encode([c.text for c in chunks])
            rows = [{"id": f"{source}#{i}", "source": source, "kind": path.suffix.lstrip(".").lower(),
                     "hash": digest, "chunk": i, "char_start": c.start, "char_end": c.end, "line": c.line,
                     "page": c.page, "text": c.text} for i, c in enumerate(chunks)]
            self.store.replace_source(source, rows, vectors)
            self._bm25 = None
            (report.updated if source in stored else report.added).append(source)
            report.chunks += len(chunks)
            if progress:
                progress(source)
        for source, why in report.unreadable:
            log.warning("skipped %s: %s", source, why)
        if report.chunks:
            self.store.optimize()
        return report

    def delete(self, paths: Iterable[str | Path]) -> list[str]:
        """Remove sources: files by path, and every source under a folder path (the files may be gone already)."""
        stored = self.store.sources()
        doomed = []
        for given in paths:
            target = str(Path(given).expanduser().resolve())
            doomed += [s for s in stored if s == target or s.startswith(target.rstrip("/") + "/")]
        doomed = list(dict.fromkeys(doomed))
        self.store.delete_sources(doomed)
        self._bm25 = None
        return doomed

    def prune(self) -> list[str]:
        """Remove the sources whose files no longer exist."""
        return self.delete([s for s in self.store.sources() if not Path(s).exists()])

    # -- search -----------------------------------------------------------------------------------------------
    def bm25_ranking(self, query: str, n: int, where: str | None) -> list[str]:
        import bm25s  # optional (the knowledge extra)

        if self._bm25 is None:
            ids, texts = self.store.texts()
            retriever = bm25s.BM25()
            if texts:
                retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
            self._bm25 = (retriever, ids)
        retriever, ids = self._bm25
        if not ids:
            return []
        tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        if not tokens:
            return []
        scores = retriever.get_scores(tokens)
        if where is not None:
            allowed = set(self.store.texts(where)[0])
            scores = np.where(np.fromiter((i in allowed for i in ids), bool, len(ids)), scores, 0.0)
        top = np.argsort(-scores, kind="stable")[:n]
        return [ids[i] for i in top if scores[i] > 0]

    def search(self, query: str, k: int = 5, filters: Mapping[str, str] | None = None, mode: str = "hybrid",
               candidates: int = 50) -> list[Hit]:
        """The `k` best chunks for `query` (see the module docstring)."""
        if mode not in MODES:
            raise UserInputError(f"unknown search mode {mode!r}; accepted: {', '.join(MODES)}", param="mode")
        if k < 1:
            raise UserInputError(f"k must be at least 1, got {k}", param="k")
        if not query.strip():
            raise UserInputError("the query is empty; give some words to search for", param="query")
        where = where_clause(filters)
        n = max(candidates, k)
        lists: dict[str, Sequence[str]] = {}
        if mode in ("hybrid", "vector"):
            lists["vector"] = [i for i, _ in self.store.vector_search(self.embedder.encode([query])[0], n, where)]
        if mode in ("hybrid", "bm25"):
            lists["bm25"] = self.bm25_ranking(query, n, where)
        fused: dict[str, float] = {}
        ranks: dict[str, dict[str, int]] = {}
        for name, ranking in lists.items():
            for rank, chunk_id in enumerate(ranking, start=1):
                fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)
                ranks.setdefault(chunk_id, {})[name] = rank
        best = sorted(fused, key=lambda i: -fused[i])[:k]
        rows = self.store.rows(best)
        return [Hit(rows[i]["source"], rows[i]["chunk"], rows[i]["line"], rows[i]["page"], rows[i]["text"],
                    fused[i], ranks[i]) for i in best if i in rows]
