"""Hugging Face BERT checkpoints (`model_type` "bert": BERT, MiniLM and the sentence-transformers encoders) into
torchbook's `Bert`: config and tensor-name mapping, registered with `torchbook.load`.

Checkpoints saved from `BertModel` name tensors `embeddings.*`, `encoder.layer.N.*`, `pooler.*`; those saved from a
model with a head (`BertForMaskedLM`, `BertForSequenceClassification`, ...) put them under `bert.` and add head
tensors, which the encoder leaves out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from torchbook.errors import CheckpointError
from torchbook.hub.hf import read_safetensors
from torchbook.hub.state import load_state
from torchbook.models.bert import Bert, BertConfig

# Hugging Face's names inside one layer -> ours (torchbook.nn.transformer.EncoderLayer).
LAYER_NAMES = {
    "attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "norm1", "intermediate.dense": "ff.linear1", "output.dense": "ff.linear2",
    "output.LayerNorm": "norm2",
}
EMBEDDING_NAMES = {"word_embeddings": "word", "position_embeddings": "position",
                   "token_type_embeddings": "token_type", "LayerNorm": "norm"}


def config_from_hf(hf: dict[str, Any]) -> BertConfig:
    """Our config from a BERT config.json (as a dict)."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported (BERT uses gelu)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {hf.get('position_embedding_type')!r} is not supported")
    return BertConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"], max_len=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2), dropout=hf.get("hidden_dropout_prob", 0.1),
        eps=hf.get("layer_norm_eps", 1e-12), pad_id=hf.get("pad_token_id") or 0,
    )


def state_dict_from_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a Hugging Face BERT state dict into ours; head tensors (`cls.*`, `classifier.*`) are left out."""
    out: dict[str, Tensor] = {}
    for name, tensor in sd.items():
        name = name.removeprefix("bert.")
        if name.startswith(("cls.", "classifier.", "qa_outputs.")) or name.endswith("position_ids"):
            continue
        if name.startswith("embeddings."):
            module, _, param = name.removeprefix("embeddings.").rpartition(".")
            out[f"embeddings.{EMBEDDING_NAMES.get(module, module)}.{param}"] = tensor
        elif name.startswith("encoder.layer."):
            layer, rest = name.removeprefix("encoder.layer.").split(".", 1)
            module, _, param = rest.rpartition(".")
            out[f"encoder.layers.{layer}.{LAYER_NAMES.get(module, module)}.{param}"] = tensor
        elif name.startswith("pooler.dense."):
            out["pooler." + name.removeprefix("pooler.dense.")] = tensor
        else:
            out[name] = tensor  # load_state names it as unexpected
    return out


def from_hf_state(config: dict[str, Any], state: dict[str, Tensor], source: str) -> Bert:
    """Our `Bert` (eval mode) from a config.json dict and a Hugging Face state dict."""
    try:
        ours = config_from_hf(config)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    renamed = state_dict_from_hf(state)
    ours.pooler = "pooler.weight" in renamed  # sentence-transformers checkpoints may drop it
    return load_state(Bert(ours), renamed, source).eval()  # type: ignore[return-value]


def load_bert_folder(folder: str | Path) -> Bert:
    """Our `Bert` from a Hugging Face folder (config.json + *.safetensors)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(folder)!r}: unreadable config.json ({e})") from None
    return from_hf_state(config, read_safetensors(folder), repr(str(folder)))


def from_hf_model(hf_model: Any) -> Bert:
    """Our `Bert` with the weights of a loaded transformers BERT model."""
    return from_hf_state(hf_model.config.to_dict(), hf_model.state_dict(), "the bert model")
