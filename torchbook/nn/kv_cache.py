"""The KV cache of incremental decoding (book chapter 17): each layer's keys and values of the tokens so far, so
that a decoding step computes attention for its new tokens only."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding.

    Each layer's entry is (B, Hkv, T, D): a view of the first T positions of a buffer that grows by doubling, so
    appending one token copies one token, not the whole cache (amortized). `reorder` follows beams in beam search.
    """

    keys: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)
    _buffers: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    def length(self, layer: int = 0) -> int:
        return self.keys[layer].size(2) if layer in self.keys else 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, Hkv, T_new, D) to the layer's entry; return all keys and values so far."""
        start = self.length(layer)
        end = start + k.size(2)
        buffer_k, buffer_v = self._buffers.get(layer) or (self.keys.get(layer, k[:, :, :0]),
                                                           self.values.get(layer, v[:, :, :0]))
        if end > buffer_k.size(2):  # grow: at least double, so n appends cost O(n) copies in all
            capacity = max(end, 2 * buffer_k.size(2))
            grown_k = k.new_empty(k.size(0), k.size(1), capacity, k.size(3))
            grown_v = v.new_empty(v.size(0), v.size(1), capacity, v.size(3))
            grown_k[:, :, :start], grown_v[:, :, :start] = buffer_k[:, :, :start], buffer_v[:, :, :start]
            buffer_k, buffer_v = grown_k, grown_v
            self._buffers[layer] = (buffer_k, buffer_v)
        buffer_k[:, :, start:end], buffer_v[:, :, start:end] = k, v
        self.keys[layer], self.values[layer] = buffer_k[:, :, :end], buffer_v[:, :, :end]
        return self.keys[layer], self.values[layer]

    def set(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store fixed keys/values (cross-attention over the encoder output, computed once)."""
        self.keys[layer], self.values[layer] = k, v

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam search: each surviving beam's parent)."""
        for layer in self.keys:
            if layer in self._buffers:  # select whole buffers, so the spare capacity stays
                length = self.length(layer)
                buffer_k, buffer_v = (b.index_select(0, index) for b in self._buffers[layer])
                self._buffers[layer] = (buffer_k, buffer_v)
                self.keys[layer], self.values[layer] = buffer_k[:, :, :length], buffer_v[:, :, :length]
            else:
                self.keys[layer] = self.keys[layer].index_select(0, index)
                self.values[layer] = self.values[layer].index_select(0, index)


class SlotCache:
    """A preallocated KV cache for serving (book chapter 17): `slots` rows of `max_len` positions per layer, each
    row with its own filled length, so that requests of different lengths decode side by side and a finished
    request's row is reused by the next one without reallocating anything.

    Each layer holds keys and values of shape (slots, Hkv, max_len, D): the shapes never change (a compiled step
    sees one shape). A step works on `view(rows, new)`: the rows' new keys/values are written at their own
    lengths, attention reads positions up to the longest filled length among the rows and masks each row's
    unfilled tail (`view.padding`). Memory: 2 x layers x Hkv x D x bytes per value, per token per slot (SmolLM2-135M
    in float32: 2 x 30 x 3 x 64 x 4 = 46 KB per token).
    """

    def __init__(self, n_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = [0] * slots  # filled positions per row
        self.slots, self.max_len = slots, max_len

    @staticmethod
    def bytes_per_token(n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32) -> int:
        return 2 * n_layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of row `source` into row `target` (a shared prefix)."""
        for buffers in (self.keys, self.values):
            for b in buffers:
                b[target, :, :length] = b[source, :, :length]
        self.lengths[target] = length

    def truncate(self, row: int, length: int) -> None:
        """Roll row `row` back to its first `length` positions (speculative decoding drops the keys and values of
        rejected draft tokens): later steps overwrite the rest, and the masks never read it."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"cannot truncate row {row} of length {self.lengths[row]} to {length}")
        self.lengths[row] = length

    def view(self, rows: list[int], new: int, static: bool = False) -> SlotView:
        """The cache as one step sees it: `rows` (slot indices, in batch order) each bring `new` tokens.
        `static`: attention reads all `max_len` positions (masked), so every step has the same shapes (a compiled
        step); one new token per row only (the causal mask of several assumes the rows end at the window's end)."""
        if any(self.lengths[r] + new > self.max_len for r in rows):
            raise ValueError(f"a row would pass the cache's max_len {self.max_len}")
        if static and new != 1:
            raise ValueError("a static view takes one new token per row")
        return SlotView(self, rows, new, static)


class SlotView:
    """One step's window on a `SlotCache` (the object attention's `cache.update(layer, k, v)` talks to).
    `starts` (B,): each row's first new position (its positions for RoPE or learned embeddings);
    `padding` (B, key_len): True where a key is not (yet) part of the row."""

    def __init__(self, cache: SlotCache, rows: list[int], new: int, static: bool = False):
        self.cache, self.rows, self.new, self.static = cache, rows, new, static
        device = cache.keys[0].device
        self.starts = torch.tensor([cache.lengths[r] for r in rows], dtype=torch.long, device=device)
        self.key_len = cache.max_len if static else max(cache.lengths[r] for r in rows) + new
        first = rows[0]
        # Consecutive rows are a slice of the buffer (read in place); others are gathered.
        self.contiguous = rows == list(range(first, first + len(rows)))
        self.index = torch.tensor(rows, dtype=torch.long, device=device)
        ends = self.starts + new
        self.padding = torch.arange(self.key_len, device=device)[None] >= ends[:, None]
        self.write_at = self.starts[:, None] + torch.arange(new, device=device)[None]  # (B, new)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, new, D) at each row's length; return the rows' keys and values up to `key_len`."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        rows = self.index[:, None].expand_as(self.write_at)
        for buffer, new in ((keys, k), (values, v)):
            # buffer[row, :, position] for every (row, new position): advanced indices first, then heads, dims.
            buffer.permute(0, 2, 1, 3).index_put_((rows, self.write_at), new.transpose(1, 2))
        if self.contiguous:
            first = self.rows[0]
            sl = slice(first, first + len(self.rows))
            return keys[sl, :, : self.key_len], values[sl, :, : self.key_len]
        return (keys[:, :, : self.key_len].index_select(0, self.index),
                values[:, :, : self.key_len].index_select(0, self.index))

    def commit(self) -> None:
        """After the step: the rows' lengths include the new tokens."""
        for r in self.rows:
            self.cache.lengths[r] += self.new
