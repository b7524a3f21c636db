"""Translation data: gettext cleaning and split properties, the BPE tokenizer, length bucketing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from torchbook.data.tokenizers import SPECIAL_TOKENS, train_bpe
from torchbook.data.translation import (
    GETTEXT_DIR,
    bucket_batches,
    catalog_bucket,
    clean_pair,
    load_gettext,
)
from torchbook.errors import DataUnavailable

pytestmark = pytest.mark.usefixtures("one_thread")


needs_catalogs = pytest.mark.skipif(not list(GETTEXT_DIR.glob("*.mo")), reason=f"no gettext catalogs in {GETTEXT_DIR}")


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return load_gettext()


def test_cleaning_removes_placeholders_accelerators_and_markup() -> None:
    assert clean_pair("failed to open %s for writing", "fallo al abrir %s para escritura") == (
        "failed to open for writing", "fallo al abrir para escritura")
    assert clean_pair("_Open", "_Abrir") == ("Open", "Abrir")
    assert clean_pair("<b>Save</b> the file %(name)s", "<b>Guardar</b> el archivo %(name)s") == (
        "Save the file", "Guardar el archivo")
    assert clean_pair("Copy '%1$s' to {0}", "Copiar «%1$s» a {0}") == ("Copy to", "Copiar a")
    assert clean_pair("Num_Lock", "Bloq Num") == ("Num_Lock", "Bloq Num")  # one side has no mark: kept as is
    assert clean_pair("line one\nline two", "línea uno\nlínea dos") is None  # usage text
    assert clean_pair("OK", "OK") is None  # untranslated
    assert clean_pair("%s", "%s") is None


@needs_catalogs
def test_gettext_split_by_catalog_is_stable_and_disjoint(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = {m["file"]: m for m in data.manifest}
    total = sum(m["pairs"] for m in data.manifest)
    for m in data.manifest:
        assert len(m["sha256"]) == 64
        if m["pairs"] > 0.10 * total:
            assert m["split"] == "train", f"{m['file']} holds over 10% of the pairs and must stay in training"
        elif catalog_bucket(m["file"]) < 10:
            assert m["split"] == "test"
    assert {m["split"] for m in data.manifest} == {"train", "val", "test"}
    assert len(data.train) > 5 * len(data.test) > 0
    # No English sentence of the test set is seen in training, and no pair repeats.
    train_sources = {en for en, _ in data.train}
    assert not train_sources & {en for en, _ in data.test}
    assert len({en for en, _ in data.test}) == len(data.test)
    # Removing a catalog moves no other catalog between splits.
    subset = tmp_path / "locale"
    subset.mkdir()
    names = sorted(manifest)
    for name in names[::2]:
        shutil.copy(GETTEXT_DIR / name, subset / name)
    fewer = load_gettext(subset)
    for m in fewer.manifest:
        big = m["pairs"] > 0.10 * sum(x["pairs"] for x in fewer.manifest)
        if not big and manifest[m["file"]]["pairs"] <= 0.10 * total:
            assert m["split"] == manifest[m["file"]]["split"], m["file"]


def test_no_catalogs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailable, match="data=tatoeba"):
        load_gettext(tmp_path)


def test_bpe_byte_fallback_represents_every_input() -> None:
    tokenizer = train_bpe(["I like soccer", "Me gusta el fútbol", "the beach", "la playa"] * 20, vocab_size=400)
    assert [tokenizer.id_to_token(i) for i in range(4)] == SPECIAL_TOKENS
    for text in ["I like soccer", "Ünïcödé 😀 ñandú 東京", "tabs\tand  spaces"]:
        encoding = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.token_to_id("<unk>") not in encoding.ids
        assert tokenizer.decode(encoding.ids) == text


def test_bucketing_is_padding_aware_and_deterministic() -> None:
    import random

    rng = random.Random(0)
    lengths = [rng.randint(2, 60) for _ in range(3000)]
    batches = bucket_batches(lengths, max_tokens=1024, max_sentences=64, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(3000))
    assert all(len(b) * max(lengths[i] for i in b) <= 1024 and len(b) <= 64 for b in batches)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.15 * sum(lengths)  # sorted pools: little padding
    assert batches == bucket_batches(lengths, 1024, 64, seed=1, epoch=0)
    assert batches != bucket_batches(lengths, 1024, 64, seed=1, epoch=1)


def test_tatoeba_archive_is_read_through_fetch_and_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loading code for the book's spa-eng.zip, exercised offline on a small archive of the same layout placed
    in the mirror (the real file cannot be downloaded here; its lines are 'English<TAB>Spanish')."""
    import zipfile

    from torchbook.data.translation import load_tatoeba

    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    lines = [f"Sentence number {i}.\tFrase número {i}." for i in range(200)] + ["Go.\tVe.", "Go.\tVete."]
    with zipfile.ZipFile(mirror / "spa-eng.zip", "w") as z:
        z.writestr("spa-eng/spa.txt", "\n".join(lines) + "\n")
    monkeypatch.setenv("TORCHBOOK_MIRROR", str(mirror))
    monkeypatch.setenv("TORCHBOOK_CACHE", str(cache))
    data = load_tatoeba(seed=3)
    assert len(data.test) == 20 and len(data.val) == 10
    assert len(data.train) + len(data.val) + len(data.test) == 201  # "Go." kept once (its first translation)
    assert not {en for en, _ in data.train} & {en for en, _ in data.test}
    assert data.manifest[0]["file"] == "spa-eng.zip" and len(data.manifest[0]["sha256"]) == 64
    assert load_tatoeba(seed=3).test == data.test
