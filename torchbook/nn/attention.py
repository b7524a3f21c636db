"""Attention (book chapters 14-15 and 17): the one implementation every torchbook transformer uses.

Scaled dot-product attention is softmax(Q K^T / sqrt(d_k)) V (the book's equation 15-1), computed with
`torch.nn.functional.scaled_dot_product_attention` (FlashAttention or memory-efficient kernels where available).
`MultiHeadAttention` covers self- and cross-attention, multi-head, grouped-query and multi-query attention
(`n_kv_heads`), rotary positions, sliding windows and an incremental KV cache for decoding.

Mask conventions: `key_padding_mask` is (batch, key_len) with True where the key is padding (as torch.nn);
`attn_mask` is a boolean (query_len, key_len) or (batch, 1|heads, query_len, key_len) mask with True where
attention is *allowed*, or a float mask added to the scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbook.nn.kv_cache import KVCache, SlotView
from torchbook.nn.positions import apply_rotary
from torchbook.nn.quantized import concat_linear


def causal_mask(query_len: int, key_len: int, device: torch.device | None = None, window: int | None = None) -> Tensor:
    """Boolean (query_len, key_len) mask, True where allowed; queries are the last `query_len` positions.

    With a cache, the query i sits at absolute position key_len - query_len + i and may attend to keys at
    positions <= its own (and, with a sliding `window`, to the last `window` of them only).
    """
    q_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]
    k_pos = torch.arange(key_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def combine_masks(
    batch: int,
    query_len: int,
    key_len: int,
    device: torch.device,
    dtype: torch.dtype,
    causal: bool = False,
    window: int | None = None,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor | None:
    """One additive float mask of shape (batch or 1, 1 or heads, query_len, key_len), or None if nothing masks."""
    if not causal and key_padding_mask is None and attn_mask is None and window is None:
        return None
    mask = torch.zeros(1, 1, query_len, key_len, device=device, dtype=dtype)
    neg = torch.finfo(dtype).min
    if causal or window is not None:
        allowed = causal_mask(query_len, key_len, device, window) if causal else torch.ones(
            query_len, key_len, dtype=torch.bool, device=device
        )
        if not causal and window is not None:
            allowed = (torch.arange(key_len, device=device)[None] - torch.arange(query_len, device=device)[:, None]).abs() < window
        mask = mask.masked_fill(~allowed, neg)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            m = attn_mask if attn_mask.dim() == 4 else attn_mask[None, None]
            mask = mask.masked_fill(~m, neg)
        else:
            mask = mask + (attn_mask if attn_mask.dim() == 4 else attn_mask[None, None]).to(dtype)
    if key_padding_mask is not None:
        mask = mask.masked_fill(key_padding_mask[:, None, None, :].to(torch.bool), neg)
    return mask


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout: float = 0.0, scale: float | None = None,
    is_causal: bool = False,
) -> Tensor:
    """q: (B, H, Tq, D), k and v: (B, Hkv, Tk, D) with H a multiple of Hkv (grouped-query attention).

    Returns (B, H, Tq, D). `mask` is additive (see `combine_masks`); `is_causal` (with no mask, Tq == Tk): query i
    sees keys 0..i, which the kernels apply blockwise, skipping the blocks above the diagonal.
    """
    # Grouped-query attention: each group of H/Hkv query heads shares one key/value head. `enable_gqa` lets the
    # kernel read the shared heads in place instead of copying the keys and values H/Hkv times (the whole cache,
    # every decoding step).
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                          is_causal=is_causal, enable_gqa=q.size(1) != k.size(1))


class MultiHeadAttention(nn.Module):
    """Multi-head attention (chapter 15): project, split into heads, attend, merge heads, project back.

    Args:
        d_model: model width (queries' input size and output size).
        n_heads: query heads.
        n_kv_heads: key/value heads (n_heads: multi-head; 1: multi-query; between: grouped-query).
        head_dim: size of each head (default d_model // n_heads).
        bias: biases on the query/key/value projections; `out_bias` on the output projection.
        kv_dim: input size of keys/values for cross-attention (default d_model).
        dropout: dropout on the attention weights (training only).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        out_bias: bool | None = None,
        kv_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        self.head_dim = head_dim or d_model // n_heads
        kv_dim = kv_dim or d_model
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias if out_bias is None else out_bias)
        self.dropout = dropout
        self.qkv_proj: nn.Module | None = None

    def fuse_qkv(self) -> None:
        """For inference: replace the query, key and value projections by one (`qkv_proj`), one matrix product
        per step instead of three (self-attention only; the model can no longer be saved in its original layout)."""
        self.qkv_proj = concat_linear([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def split_heads(self, x: Tensor, n_heads: int) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        window: int | None = None,
        cache: KVCache | SlotView | None = None,
        layer: int = 0,
        static_kv: bool = False,
    ) -> Tensor:
        """x: (B, Tq, d_model); context: (B, Tk, kv_dim) for cross-attention (default: x). Returns (B, Tq, d_model).

        `rotary` = (cos, sin) for the query positions, each (Tq, head_dim) or (B, Tq, head_dim) (see
        `torchbook.nn.positions.apply_rotary`). With a `cache`, new keys/values are appended (self-attention) or
        computed once and reused (`static_kv=True`, cross-attention over a fixed encoder output).
        `key_padding_mask` covers all keys, cached ones included.
        """
        batch, query_len, _ = x.shape
        if self.qkv_proj is not None:  # fused (self-attention): queries and keys are rotated together
            if context is not None:
                raise ValueError("fuse_qkv() serves self-attention only; this call attends to a context")
            heads = self.split_heads(self.qkv_proj(x), self.n_heads + 2 * self.n_kv_heads)
            qk, v = heads.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=1)
            if rotary is not None:
                qk, rotary = apply_rotary(qk, *rotary), None
            q, k = qk.split([self.n_heads, self.n_kv_heads], dim=1)
        else:
            q = self.split_heads(self.q_proj(x), self.n_heads)
        if isinstance(cache, KVCache) and static_kv and layer in cache.keys:
            k, v = cache.keys[layer], cache.values[layer]
        else:
            if self.qkv_proj is None:
                source = x if context is None else context
                k = self.split_heads(self.k_proj(source), self.n_kv_heads)
                v = self.split_heads(self.v_proj(source), self.n_kv_heads)
            if rotary is not None:
                cos, sin = rotary
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if isinstance(cache, SlotView) and cache.packed:
                return self.out_proj(self._attend_packed(q, k, v, cache, layer))
            if cache is not None:
                if static_kv and isinstance(cache, KVCache):
                    cache.set(layer, k, v)
                else:
                    k, v = cache.update(layer, k, v)
        key_len = k.size(2)
        # A single new query attends to every cached key anyway: skip building a causal mask then.
        needs_causal = causal and not (query_len == 1 and window is None)
        # Causal and nothing else (training, a prompt without padding): the kernel's own causal mode, which skips
        # the blocks above the diagonal (half the scores) instead of adding a (Tq, Tk) mask to all.
        kernel_causal = (needs_causal and query_len == key_len and window is None and key_padding_mask is None
                         and attn_mask is None)
        mask = None
        if not kernel_causal:
            mask = combine_masks(
                batch, query_len, key_len, x.device, q.dtype, needs_causal, window if causal else None,
                key_padding_mask, attn_mask,
            )
        if causal and window is not None and query_len == 1 and key_len > window:
            mask = combine_masks(batch, 1, key_len, x.device, q.dtype, True, window, key_padding_mask, attn_mask)
        out = scaled_dot_product_attention(q, k, v, mask, self.dropout if self.training else 0.0,
                                           is_causal=kernel_causal)
        out = out.transpose(1, 2).reshape(batch, query_len, self.n_heads * self.head_dim)
        return self.out_proj(out)

    def _attend_packed(self, q: Tensor, k: Tensor, v: Tensor, view: SlotView, layer: int) -> Tensor:
        """A packed serving step (`SlotView.packed`): q, k, v (1, H|Hkv, N, D) hold several rows' new tokens one
        after the other (prompt chunks and one-token decoding rows). The new keys and values go into the slot
        cache; each group of rows with as many new tokens attends as one batch to its own rows' keys, under each
        row's causal mask (its cached positions, then its new tokens up to itself). Returns (1, N, H * D)."""
        view.write(layer, k, v)
        parts = []
        for group in view.groups:
            keys, values = view.read(layer, group.rows, group.index, group.key_len)
            rows = len(group.rows)
            queries = q[0, :, group.first : group.first + rows * group.count]  # (H, rows * count, D)
            queries = queries.unflatten(1, (rows, group.count)).transpose(0, 1)  # (rows, H, count, D)
            if group.mask is None or group.mask.dtype != q.dtype:  # the same for every layer
                group.mask = combine_masks(rows, group.count, group.key_len, q.device, q.dtype,
                                           attn_mask=group.allowed)
            out = scaled_dot_product_attention(queries, keys, values, group.mask)  # (rows, H, count, D)
            parts.append(out.permute(0, 2, 1, 3).reshape(rows * group.count, self.n_heads * self.head_dim))
        return torch.cat(parts)[None] if len(parts) > 1 else parts[0][None]
