"""Positional encodings (chapter 15): sinusoidal (the original Transformer), learned, and rotary (RoPE)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalPositionalEncoding(nn.Module):
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)) (the book's equation 15-2).

    Added to the token embeddings: (B, T, d) -> (B, T, d), with dropout as in the paper.
    """

    def __init__(self, d_model: int, max_len: int = 4096, dropout: float = 0.0):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_len, d_model)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
        self.table: Tensor
        self.register_buffer("table", table, persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        return self.dropout(x + self.table[offset : offset + x.size(1)])


class LearnedPositionalEmbedding(nn.Module):
    """A trainable vector per position (GPT-2, BERT), added to the token embeddings."""

    def __init__(self, max_len: int, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(max_len, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        positions = torch.arange(offset, offset + x.size(1), device=x.device)
        return self.dropout(x + self.embedding(positions))


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension (the Hugging Face/Llama layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x: (B, H, T, D) by position-dependent angles; cos and sin are (T, D) or (B, T, D)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021): queries and keys are rotated by angle p * theta_i.

    `inv_freq` may be rescaled (linear, NTK, Llama-3 style) by the model family that needs it; `forward(positions)`
    gives (cos, sin), each (..., T, head_dim), to pass to `MultiHeadAttention(rotary=...)`.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, inv_freq: Tensor | None = None, scaling: float = 1.0):
        super().__init__()
        if inv_freq is None:
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = scaling  # attention scaling some variants apply to cos/sin (1.0 for plain RoPE)

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # (..., T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (..., T, D)
        return (angles.cos() * self.scaling).to(dtype), (angles.sin() * self.scaling).to(dtype)
