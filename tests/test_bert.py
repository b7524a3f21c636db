"""BERT (chapter 15): our encoder against transformers' BertModel on tiny random models and on the real
all-MiniLM-L6-v2 weights, and our sentence embeddings against sentence-transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchbook
from torchbook.errors import CheckpointError
from torchbook.hub.bert import from_hf_model
from torchbook.models.bert import mean_pooling

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")


def tiny_bert(seed: int = 0, **overrides):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64, type_vocab_size=2,
                                     **overrides)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # random LayerNorm parameters too, so a swapped weight and bias cannot pass
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    return model


def batch(vocab: int = 99, lengths: tuple[int, ...] = (11, 7, 3)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    ids = ids * mask  # padding id 0
    types = (torch.arange(ids.size(1))[None] >= 4).long() * mask
    return ids, mask, types


def test_tiny_bert_matches_transformers() -> None:
    reference = tiny_bert()
    ours = from_hf_model(reference)
    ids, mask, types = batch()
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask, token_type_ids=types)
        hidden = ours(ids, mask, types)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], theirs.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pool(hidden), theirs.pooler_output, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # sentence embeddings: one segment
        pooled = mean_pooling(reference(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    torch.testing.assert_close(ours.sentence_embeddings(ids, mask), torch.nn.functional.normalize(pooled), atol=1e-5,
                               rtol=1e-5)


def test_hf_folder_loads_through_torchbook_load(tmp_path: Path) -> None:
    """A `BertForMaskedLM` folder (tensors under `bert.`, a head to leave out) loads by its model_type."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64)
    reference = transformers.BertForMaskedLM(config).eval()
    reference.save_pretrained(tmp_path)
    loaded = torchbook.load(tmp_path)
    assert loaded.meta["model_type"] == "bert"
    ids, mask, _ = batch()
    with torch.no_grad():
        theirs = reference.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = loaded.model(ids, mask)
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    reference = tiny_bert()
    reference.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors.*encoder.layers.1.ff.linear2.weight"):
        torchbook.load(tmp_path)
