"""Attention for RNN encoder-decoders (chapter 14): Bahdanau (additive) and Luong (multiplicative).

Both score every encoder output h_s against a decoder state h_t, softmax the scores over the source positions
(padding masked out) and return the context vector, the weighted sum of the encoder outputs:

- Bahdanau et al. (2014), concat/additive: score(h_t, h_s) = v^T tanh(W_q h_t + W_k h_s).
- Luong et al. (2015), general: score(h_t, h_s) = h_t^T W h_s (`kind="general"`) or dot: h_t^T h_s (`kind="dot"`).

Queries may hold several decoder steps at once, (B, T, d_query), so teacher-forced training attends for the whole
target in one call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def attend(scores: Tensor, values: Tensor, padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """scores (B, T, S), values (B, S, d), padding_mask (B, S) True at padding -> context (B, T, d), weights."""
    if padding_mask is not None:
        scores = scores.masked_fill(padding_mask[:, None, :], torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    return weights @ values, weights


class BahdanauAttention(nn.Module):
    """Additive attention: v^T tanh(W_q q + W_k k)."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)
        self.key_proj = nn.Linear(key_dim, attention_dim)
        self.v = nn.Linear(attention_dim, 1, bias=False)

    def project_keys(self, keys: Tensor) -> Tensor:
        """W_k h_s for every source position, computed once per source sentence (B, S, attention_dim)."""
        return self.key_proj(keys)

    def forward(
        self, query: Tensor, keys: Tensor, padding_mask: Tensor | None = None, projected_keys: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """query (B, T, query_dim), keys (B, S, key_dim) -> context (B, T, key_dim), weights (B, T, S)."""
        projected = self.project_keys(keys) if projected_keys is None else projected_keys
        hidden = torch.tanh(self.query_proj(query)[:, :, None, :] + projected[:, None, :, :])  # (B, T, S, A)
        return attend(self.v(hidden).squeeze(-1), keys, padding_mask)


class LuongAttention(nn.Module):
    """Multiplicative attention: q^T W k ("general") or q^T k ("dot", equal sizes)."""

    def __init__(self, query_dim: int, key_dim: int, kind: str = "general"):
        super().__init__()
        if kind not in ("general", "dot"):
            raise ValueError(f"Luong attention kind {kind!r}: accepted are 'general' and 'dot'")
        if kind == "dot" and query_dim != key_dim:
            raise ValueError(f"dot attention needs equal query and key sizes, got {query_dim} and {key_dim}")
        self.key_proj = nn.Linear(key_dim, query_dim, bias=False) if kind == "general" else nn.Identity()

    def project_keys(self, keys: Tensor) -> Tensor:
        return self.key_proj(keys)  # type: ignore[no-any-return]

    def forward(
        self, query: Tensor, keys: Tensor, padding_mask: Tensor | None = None, projected_keys: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        projected = self.project_keys(keys) if projected_keys is None else projected_keys
        return attend(query @ projected.transpose(1, 2), keys, padding_mask)
