"""The original Transformer for translation (chapter 15; Vaswani et al. 2017, "Attention Is All You Need").

Source tokens -> shared embedding * sqrt(d_model) + sinusoidal positions -> encoder stack -> memory.
Target tokens (shifted right, starting with <s>) -> the same embedding + positions -> decoder stack (causal
self-attention, cross-attention over memory) -> a vocabulary projection tied to the embedding (the paper shares
the three matrices; our BPE vocabulary is shared by English and Spanish).

Decoding follows the protocol of `torchbook.generate.engine`: `start_decoding(batch_size, source=...)` encodes the
source once; `decode_step(tokens, state)` runs the decoder on the new tokens with a KV cache (self-attention keys
and values appended, cross-attention keys and values computed once), returning the last position's logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor, nn

from torchbook.nn.kv_cache import KVCache
from torchbook.nn.positions import LearnedPositionalEmbedding, SinusoidalPositionalEncoding
from torchbook.nn.transformer import Decoder, Encoder


@dataclass
class TransformerConfig:
    vocab_size: int = 10_000
    d_model: int = 128  # the book's embedding size (the paper: 512)
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 512  # feed-forward width (4 x d_model, as in the paper)
    dropout: float = 0.1
    max_len: int = 256  # longest sequence the position table covers
    positions: str = "sinusoidal"  # or "learned"
    norm_first: bool = False  # False: post-norm (the paper); True: pre-norm
    final_norm: bool = False  # a LayerNorm after each stack (what torch.nn.Transformer adds; needed with pre-norm)
    tie_embeddings: bool = True  # output projection = embedding matrix
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2


@dataclass
class TranslatorState:
    """Decoding state of encoder-decoder Transformers: the encoded source and the decoder's caches."""

    memory: Tensor  # (B, S, d_model)
    source_padding: Tensor  # (B, S), True at padding
    self_cache: KVCache = field(default_factory=KVCache)
    cross_cache: KVCache = field(default_factory=KVCache)

    def reorder(self, index: Tensor) -> None:
        self.memory = self.memory.index_select(0, index)
        self.source_padding = self.source_padding.index_select(0, index)
        self.self_cache.reorder(index)
        self.cross_cache.reorder(index)

    def fresh(self) -> TranslatorState:
        return TranslatorState(self.memory, self.source_padding)


class TransformerTranslator(nn.Module):
    config_class = TransformerConfig

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_id)
        nn.init.normal_(self.embedding.weight, std=c.d_model**-0.5)
        self.positions: nn.Module = (
            SinusoidalPositionalEncoding(c.d_model, c.max_len, c.dropout)
            if c.positions == "sinusoidal"
            else LearnedPositionalEmbedding(c.max_len, c.d_model, c.dropout)
        )
        self.encoder = Encoder(c.n_encoder_layers, c.d_model, c.n_heads, c.d_ff, c.dropout, c.norm_first, c.final_norm)
        self.decoder = Decoder(c.n_decoder_layers, c.d_model, c.n_heads, c.d_ff, c.dropout, c.norm_first, c.final_norm)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.head.weight = self.embedding.weight

    def embed(self, tokens: Tensor, offset: int = 0) -> Tensor:
        return self.positions(self.embedding(tokens) * math.sqrt(self.config.d_model), offset)  # type: ignore[no-any-return]

    def encode(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """source (B, S) token ids -> memory (B, S, d_model) and its padding mask (B, S)."""
        padding = source == self.config.pad_id
        return self.encoder(self.embed(source), padding), padding

    def forward(self, source: Tensor, target_in: Tensor, keep: Tensor | None = None) -> Tensor:
        """Teacher forcing: source (B, S), decoder input target_in (B, T) -> logits (B, T, vocab), or, given a
        boolean `keep` (B, T), logits (N, vocab) of the kept positions only: training skips the vocabulary
        projection (the largest matrix product) at padding."""
        memory, padding = self.encode(source)
        hidden = self.decoder(self.embed(target_in), memory, padding)
        return self.head(hidden if keep is None else hidden[keep])  # type: ignore[no-any-return]

    # -- the decoding protocol (torchbook.generate.engine) ---------------------------------------------------
    def start_decoding(self, batch_size: int, source: Tensor) -> TranslatorState:
        memory, padding = self.encode(source)
        return TranslatorState(memory, padding)

    def decode_step(self, tokens: Tensor, state: TranslatorState) -> Tensor:
        x = self.embed(tokens, offset=state.self_cache.length())
        x = self.decoder(x, state.memory, state.source_padding, state.self_cache, state.cross_cache)
        return self.head(x[:, -1])  # type: ignore[no-any-return]
