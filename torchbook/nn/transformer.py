"""Transformer encoder and decoder layers (chapter 15, Vaswani et al. 2017), post-norm as in the paper or pre-norm.

Post-norm (the paper, `norm_first=False`): x = LayerNorm(x + Sublayer(x)). Pre-norm (`norm_first=True`, GPT-2 and
most later models): x = x + Sublayer(LayerNorm(x)), which trains more stably without warm-up; a pre-norm stack
ends with a final LayerNorm (`final_norm=True`). Module names follow `torch.nn.TransformerEncoderLayer` /
`TransformerDecoderLayer` (linear1, linear2, norm1..3), so weights map one to one (see tests/test_nn_transformer.py:
with the final norms torch adds, our encoder-decoder equals `torch.nn.Transformer`).

Attention is `torchbook.nn.attention.MultiHeadAttention`; the decoder's self-attention appends to a `KVCache` and
its cross-attention computes the encoder's keys/values once (`static_kv`) when decoding incrementally.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from torchbook.nn.attention import MultiHeadAttention
from torchbook.nn.drop import drop_path
from torchbook.nn.kv_cache import KVCache

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


class FeedForward(nn.Module):
    """Position-wise feed-forward network: Linear(d, d_ff), activation, dropout, Linear(d_ff, d)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each with a residual connection, dropout and LayerNorm."""

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, norm_first: bool = False,
        activation: str = "relu", eps: float = 1e-5, drop_path: float = 0.0,
    ):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.ff = FeedForward(d_model, d_ff, dropout, activation)
        self.drop_path = drop_path  # stochastic depth on both residual branches (vision transformers); 0 = off
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, S, d_model); key_padding_mask: (B, S), True at padding."""
        p, training = self.drop_path, self.training
        if self.norm_first:
            h = self.norm1(x)
            x = x + drop_path(self.dropout1(self.self_attn(h, key_padding_mask=key_padding_mask)), p, training)
            return x + drop_path(self.dropout2(self.ff(self.norm2(x))), p, training)
        x = self.norm1(x + drop_path(self.dropout1(self.self_attn(x, key_padding_mask=key_padding_mask)), p, training))
        return self.norm2(x + drop_path(self.dropout2(self.ff(x)), p, training))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder output (`memory`), feed-forward."""

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, norm_first: bool = False,
        activation: str = "relu", eps: float = 1e-5,
    ):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.ff = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.norm3 = nn.LayerNorm(d_model, eps=eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor | None = None,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """x: (B, T, d_model) target positions (the new ones when decoding with a cache); memory: (B, S, d_model)."""

        def self_block(h: Tensor) -> Tensor:
            return self.dropout1(self.self_attn(h, causal=True, cache=self_cache, layer=layer))

        def cross_block(h: Tensor) -> Tensor:
            out = self.cross_attn(
                h, memory, key_padding_mask=memory_padding_mask, cache=cross_cache, layer=layer,
                static_kv=cross_cache is not None,
            )
            return self.dropout2(out)

        if self.norm_first:
            x = x + self_block(self.norm1(x))
            x = x + cross_block(self.norm2(x))
            return x + self.dropout3(self.ff(self.norm3(x)))
        x = self.norm1(x + self_block(x))
        x = self.norm2(x + cross_block(x))
        return self.norm3(x + self.dropout3(self.ff(x)))


class _Stack(nn.Module):
    """`n_layers` layers of `layer_class`, with an optional final LayerNorm (needed after pre-norm layers)."""

    layer_class: type[nn.Module]

    def __init__(
        self, n_layers: int, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, norm_first: bool = False,
        final_norm: bool = False, activation: str = "relu", eps: float = 1e-5,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            self.layer_class(d_model, n_heads, d_ff, dropout, norm_first, activation, eps) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model, eps=eps) if final_norm else nn.Identity()


class Encoder(_Stack):
    """A stack of encoder layers, with an optional final LayerNorm."""

    layer_class = EncoderLayer

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return self.norm(x)


class Decoder(_Stack):
    """A stack of decoder layers, with an optional final LayerNorm; caches are per stack, one entry per layer."""

    layer_class = DecoderLayer

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor | None = None,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
    ) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, memory_padding_mask, self_cache, cross_cache, i)
        return self.norm(x)
