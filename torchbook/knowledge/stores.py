"""Where a knowledge base keeps its chunks: one interface (`Store`), two backends.

- `LanceStore` (the default): LanceDB, an embedded on-disk columnar database in a folder; nothing to run.
- `PgStore`: PostgreSQL with the pgvector extension (`postgresql://...`), for bases that outgrow one machine.

A row is one chunk: `id` (source + chunk number), `source` (the file's absolute path), `kind` (its suffix),
`hash` (SHA-256 of the file's bytes), `chunk`, `char_start`, `char_end`, `line`, `page`, `text`, and `vector`
(unit-length float32 of the embedder's dimension). `replace_source` swaps all of a file's chunks in one commit
(LanceDB's merge-insert, a PostgreSQL transaction), so an interrupted ingest never leaves half a file: a file is
either in the base with all its chunks at one hash, or it is not (and the next `index` adds it).

Metadata filters are one small SQL dialect both databases read (`where_clause`): `source` and `kind`, equality
or shell-style patterns (`*`, `?`).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from torchbook.errors import UserInputError
from torchbook.io import atomic_write_json

log = logging.getLogger(__name__)

COLUMNS = ("id", "source", "kind", "hash", "chunk", "char_start", "char_end", "line", "page", "text")
FILTER_FIELDS = ("source", "kind")
# Below this many chunks exact vector search is fast enough (milliseconds); from here on `optimize` builds an
# approximate index (LanceDB IVF_HNSW_SQ, pgvector HNSW): at 100k chunks exact search takes about 0.4-0.5 s here.
VECTOR_INDEX_MIN_ROWS = 20_000
# Candidates an HNSW search keeps: LanceDB's default follows k, so a query for the single nearest chunk got lost
# in the graph (found 4% of stored vectors at 100k chunks); pgvector's default is 40.
HNSW_EF = 100


def where_clause(filters: Mapping[str, str] | None) -> str | None:
    """SQL for metadata filters: {"kind": "md", "source": "*/docs/*"} -> "kind = 'md' AND source LIKE '%/docs/%'"."""
    if not filters:
        return None
    parts = []
    for field, value in filters.items():
        if field not in FILTER_FIELDS:
            raise UserInputError(f"cannot filter on {field!r}; accepted fields: {', '.join(FILTER_FIELDS)}",
                                 param="filter")
        if field == "kind":
            value = value.lstrip(".").lower()
        quoted = value.replace("'", "''")
        if "*" in value or "?" in value:
            pattern = quoted.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            pattern = pattern.replace("*", "%").replace("?", "_")
            parts.append(f"{field} LIKE '{pattern}'")
        else:
            parts.append(f"{field} = '{quoted}'")
    return " AND ".join(parts)


class Store(ABC):
    """The chunks of one knowledge base, with their vectors, and the base's metadata (embedder name, dimension)."""

    location: str

    @abstractmethod
    def read_meta(self) -> dict[str, Any] | None: ...

    @abstractmethod
    def write_meta(self, meta: dict[str, Any]) -> None: ...

    @abstractmethod
    def replace_source(self, source: str, rows: Sequence[dict[str, Any]], vectors: np.ndarray) -> None:
        """All chunks of `source` become `rows` (with `vectors`), in one commit."""

    @abstractmethod
    def add(self, rows: Sequence[dict[str, Any]], vectors: np.ndarray) -> None:
        """Append chunks in bulk (benchmarks, imports); `replace_source` is the ingest path."""

    @abstractmethod
    def delete_sources(self, sources: Sequence[str]) -> int:
        """Remove these sources' chunks; the number of chunks removed."""

    @abstractmethod
    def sources(self) -> dict[str, str]:
        """Every source in the base and its content hash."""

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def optimize(self) -> bool:
        """Build (or bring up to date) the approximate vector index once the base reaches `VECTOR_INDEX_MIN_ROWS`;
        True when an index serves searches."""

    @abstractmethod
    def vector_search(self, vector: np.ndarray, k: int, where: str | None = None) -> list[tuple[str, float]]:
        """The `k` nearest chunks by cosine similarity: (id, similarity), best first."""

    @abstractmethod
    def texts(self, where: str | None = None) -> tuple[list[str], list[str]]:
        """(ids, texts) of every chunk that `where` keeps (all without it)."""

    @abstractmethod
    def rows(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored columns (all but the vector) of these chunks, by id."""


class LanceStore(Store):
    """A LanceDB database in a folder (table `chunks`, and `meta.json` beside it)."""

    TABLE = "chunks"

    def __init__(self, folder: str | Path):
        import lancedb  # heavy, optional (the knowledge extra)

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.location = str(self.folder)
        self.db = lancedb.connect(str(self.folder))
        self._table: Any = None

    def table(self, dim: int | None = None):  # type: ignore[no-untyped-def]
        if self._table is None:
            if self.TABLE in self.db.list_tables().tables:
                self._table = self.db.open_table(self.TABLE)
            elif dim is not None:
                self._table = self.db.create_table(self.TABLE, schema=self.schema(dim))
        return self._table

    @staticmethod
    def schema(dim: int):  # type: ignore[no-untyped-def]
        import pyarrow as pa

        ints = ("chunk", "char_start", "char_end", "line", "page")
        fields = [pa.field(c, pa.int64() if c in ints else pa.string()) for c in COLUMNS]
        return pa.schema([*fields, pa.field("vector", pa.list_(pa.float32(), dim))])

    def read_meta(self) -> dict[str, Any] | None:
        path = self.folder / "meta.json"
        return json.loads(path.read_text()) if path.exists() else None

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_json(self.folder / "meta.json", meta)

    def _arrow(self, rows: Sequence[dict[str, Any]], vectors: np.ndarray):  # type: ignore[no-untyped-def]
        import pyarrow as pa

        schema = self.schema(vectors.shape[1])
        data: dict[str, Any] = {c: [row[c] for row in rows] for c in COLUMNS}
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        data["vector"] = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
        return pa.Table.from_pydict(data, schema=schema)

    def add(self, rows: Sequence[dict[str, Any]], vectors: np.ndarray) -> None:
        self.table(vectors.shape[1]).add(self._arrow(rows, vectors))

    def replace_source(self, source: str, rows: Sequence[dict[str, Any]], vectors: np.ndarray) -> None:
        table = self.table(vectors.shape[1])
        batch = self._arrow(rows, vectors)
        quoted = source.replace("'", "''")
        (table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
         .when_not_matched_by_source_delete(f"source = '{quoted}'").execute(batch))

    def delete_sources(self, sources: Sequence[str]) -> int:
        table = self.table()
        if table is None or not sources:
            return 0
        before = table.count_rows()
        listed = ", ".join("'" + s.replace("'", "''") + "'" for s in sources)
        table.delete(f"source IN ({listed})")
        return before - table.count_rows()

    def _select(self, columns: list[str], where: str | None = None):  # type: ignore[no-untyped-def]
        table = self.table()
        if table is None:
            return None
        query = table.search().select(columns).limit(table.count_rows() or 1)
        if where:
            query = query.where(where)
        return query.to_arrow()

    def sources(self) -> dict[str, str]:
        arrow = self._select(["source", "hash"])
        if arrow is None:
            return {}
        return dict(zip(arrow["source"].to_pylist(), arrow["hash"].to_pylist()))

    def count(self) -> int:
        table = self.table()
        return 0 if table is None else table.count_rows()

    def optimize(self) -> bool:
        table = self.table()
        if table is None:
            return False
        indexed = any("vector" in (getattr(i, "columns", None) or []) for i in table.list_indices())
        if indexed:
            table.optimize()  # new rows into the indexes, small files compacted
            return True
        if table.count_rows() < VECTOR_INDEX_MIN_ROWS:
            return False
        log.info("building the vector index of %s (%d chunks)", self.location, table.count_rows())
        # One partition: a plain HNSW graph (8-bit scalar-quantized vectors). IVF partitions lose the nearest chunk
        # when vectors do not cluster: on 100k random unit vectors, the default partitions found a stored vector
        # plus noise first 4% of the time (benchmarks/rag.py).
        table.create_index(metric="cosine", index_type="IVF_HNSW_SQ", vector_column_name="vector", num_partitions=1)
        table.create_scalar_index("id")
        table.create_scalar_index("source")
        return True

    def vector_search(self, vector: np.ndarray, k: int, where: str | None = None) -> list[tuple[str, float]]:
        table = self.table()
        if table is None:
            return []
        query = table.search(vector.astype(np.float32)).distance_type("cosine").select(["id", "_distance"]).limit(k)
        query = query.ef(max(HNSW_EF, 2 * k))  # the HNSW search's beam (ignored by exact search)
        if where:
            query = query.where(where, prefilter=True)
        arrow = query.to_arrow()
        return [(i, 1.0 - d) for i, d in zip(arrow["id"].to_pylist(), arrow["_distance"].to_pylist())]

    def texts(self, where: str | None = None) -> tuple[list[str], list[str]]:
        arrow = self._select(["id", "text"], where)
        return ([], []) if arrow is None else (arrow["id"].to_pylist(), arrow["text"].to_pylist())

    def rows(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        listed = ", ".join("'" + i.replace("'", "''") + "'" for i in ids)
        arrow = self._select(list(COLUMNS), f"id IN ({listed})")
        return {} if arrow is None else {row["id"]: row for row in arrow.to_pylist()}


class PgStore(Store):
    """PostgreSQL with pgvector (`postgresql://...`): tables `torchbook_chunks` and `torchbook_meta`."""

    def __init__(self, uri: str):
        import psycopg  # optional (the knowledge extra)
        from pgvector.psycopg import register_vector

        self.location = uri
        try:
            self.conn = psycopg.connect(uri, autocommit=True)
        except psycopg.OperationalError as e:
            raise UserInputError(f"cannot connect to {uri!r}: {str(e).strip().splitlines()[0]}", param="db") from None
        self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(self.conn)
        self.conn.execute(f"SET hnsw.ef_search = {HNSW_EF}")
        self.conn.execute("CREATE TABLE IF NOT EXISTS torchbook_meta (key text PRIMARY KEY, value text NOT NULL)")
        self._dim: int | None = None

    def _ensure_table(self, dim: int) -> None:
        if self._dim == dim:
            return
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS torchbook_chunks (id text PRIMARY KEY, source text NOT NULL, kind text, "
            "hash text, chunk int, char_start int, char_end int, line int, page int, text text, "
            f"vector vector({int(dim)}) NOT NULL)")
        self.conn.execute("CREATE INDEX IF NOT EXISTS torchbook_chunks_source ON torchbook_chunks (source)")
        self._dim = dim

    def _has_table(self) -> bool:
        row = self.conn.execute("SELECT to_regclass('torchbook_chunks') IS NOT NULL").fetchone()
        return bool(row and row[0])

    def read_meta(self) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT value FROM torchbook_meta WHERE key = 'meta'").fetchone()
        return json.loads(row[0]) if row else None

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.conn.execute("INSERT INTO torchbook_meta VALUES ('meta', %s) ON CONFLICT (key) DO UPDATE SET "
                          "value = EXCLUDED.value", (json.dumps(meta),))

    def _copy(self, cursor: Any, rows: Sequence[dict[str, Any]], vectors: np.ndarray) -> None:
        with cursor.copy(f"COPY torchbook_chunks ({', '.join(COLUMNS)}, vector) FROM STDIN") as copy:
            for row, vector in zip(rows, vectors.astype(np.float32)):
                copy.write_row([row[c] for c in COLUMNS] + ["[" + ",".join(map(repr, vector.tolist())) + "]"])

    def add(self, rows: Sequence[dict[str, Any]], vectors: np.ndarray) -> None:
        self._ensure_table(vectors.shape[1])
        with self.conn.transaction(), self.conn.cursor() as cursor:
            self._copy(cursor, rows, vectors)

    def replace_source(self, source: str, rows: Sequence[dict[str, Any]], vectors: np.ndarray) -> None:
        self._ensure_table(vectors.shape[1])
        with self.conn.transaction(), self.conn.cursor() as cursor:
            cursor.execute("DELETE FROM torchbook_chunks WHERE source = %s", (source,))
            self._copy(cursor, rows, vectors)

    def delete_sources(self, sources: Sequence[str]) -> int:
        if not sources or not self._has_table():
            return 0
        return self.conn.execute("DELETE FROM torchbook_chunks WHERE source = ANY(%s)", (list(sources),)).rowcount

    def sources(self) -> dict[str, str]:
        if not self._has_table():
            return {}
        return dict(self.conn.execute("SELECT DISTINCT source, hash FROM torchbook_chunks").fetchall())

    def count(self) -> int:
        row = self.conn.execute("SELECT count(*) FROM torchbook_chunks").fetchone() if self._has_table() else None
        return int(row[0]) if row else 0

    def optimize(self) -> bool:
        if self.count() < VECTOR_INDEX_MIN_ROWS:
            return False
        log.info("building the vector index of %s", self.location)
        self.conn.execute("SET maintenance_work_mem = '1GB'")  # the graph in memory: builds many times faster
        self.conn.execute("CREATE INDEX IF NOT EXISTS torchbook_chunks_hnsw ON torchbook_chunks "
                          "USING hnsw (vector vector_cosine_ops)")
        return True

    def vector_search(self, vector: np.ndarray, k: int, where: str | None = None) -> list[tuple[str, float]]:
        if not self._has_table():
            return []
        where = where.replace("%", "%%") if where else None  # psycopg's placeholders are %s
        sql = (f"SELECT id, 1 - (vector <=> %s) FROM torchbook_chunks {'WHERE ' + where if where else ''} "
               "ORDER BY vector <=> %s LIMIT %s")
        value = vector.astype(np.float32)
        return [(i, float(s)) for i, s in self.conn.execute(sql, (value, value, k)).fetchall()]

    def texts(self, where: str | None = None) -> tuple[list[str], list[str]]:
        if not self._has_table():
            return [], []
        rows = self.conn.execute(f"SELECT id, text FROM torchbook_chunks {'WHERE ' + where if where else ''} "
                                 "ORDER BY id").fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def rows(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        cursor = self.conn.execute(f"SELECT {', '.join(COLUMNS)} FROM torchbook_chunks WHERE id = ANY(%s)",
                                   (list(ids),))
        return {row[0]: dict(zip(COLUMNS, row)) for row in cursor.fetchall()}
