"""BERT, the encoder-only Transformer (chapter 15; Devlin et al. 2018), and its sentence embeddings.

Token + position + segment embeddings -> LayerNorm -> dropout -> a stack of post-norm encoder layers (GELU,
LayerNorm eps 1e-12) from `torchbook.nn.transformer` -> hidden states (B, S, d_model); the pooler (a dense layer
and tanh on the first token, [CLS]) feeds next-sentence prediction and classification heads.

Sentence embeddings (chapter 15, all-MiniLM-L6-v2 and its cousins): the mean of the token states over the
non-padding positions, normalised to unit length (`mean_pooling`, `sentence_embeddings`), so that the dot product
of two embeddings is their cosine similarity.

Hugging Face checkpoints load through `torchbook.load` (`torchbook.hub.bert`); this file holds the model only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbook.nn.transformer import Encoder


@dataclass
class BertConfig:
    vocab_size: int = 30522
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    max_len: int = 512  # position table size
    type_vocab_size: int = 2  # segments (sentence A / sentence B)
    dropout: float = 0.1
    eps: float = 1e-12
    pad_id: int = 0
    pooler: bool = True  # the dense + tanh layer over [CLS]


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_id)
        self.position = nn.Embedding(c.max_len, c.d_model)
        self.token_type = nn.Embedding(c.type_vocab_size, c.d_model)
        self.norm = nn.LayerNorm(c.d_model, eps=c.eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class Bert(nn.Module):
    """The BERT encoder: `forward` gives the last hidden states (B, S, d_model); `pool` the [CLS] pooler output."""

    config_class = BertConfig

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.embeddings = BertEmbeddings(c)
        self.encoder = Encoder(c.n_layers, c.d_model, c.n_heads, c.d_ff, c.dropout, norm_first=False,
                               final_norm=False, activation="gelu", eps=c.eps)
        self.pooler = nn.Linear(c.d_model, c.d_model) if c.pooler else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """BERT's initialisation: normal(0, 0.02) weights, zero biases."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids: (B, S); attention_mask: (B, S), 1 on real tokens and 0 on padding. Returns (B, S, d_model)."""
        # No padding in the batch (length-sorted batches of full chunks): no mask, so attention may take a fused kernel.
        padding = None if attention_mask is None or bool(attention_mask.all()) else attention_mask == 0
        return self.encoder(self.embeddings(input_ids, token_type_ids), key_padding_mask=padding)

    def pool(self, hidden: Tensor) -> Tensor:
        """The pooler output: tanh(dense(hidden state of [CLS])), (B, d_model)."""
        if self.pooler is None:
            raise ValueError("this BERT has no pooler layer")
        return torch.tanh(self.pooler(hidden[:, 0]))

    @torch.no_grad()
    def sentence_embeddings(self, input_ids: Tensor, attention_mask: Tensor, normalize: bool = True) -> Tensor:
        """Mean-pooled (and by default unit-length) sentence embeddings, (B, d_model)."""
        pooled = mean_pooling(self(input_ids, attention_mask), attention_mask)
        return F.normalize(pooled, dim=-1) if normalize else pooled


def mean_pooling(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The mean of the hidden states (B, S, d) over the positions where `attention_mask` (B, S) is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
