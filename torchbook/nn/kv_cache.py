"""The KV cache of incremental decoding (book chapter 17): each layer's keys and values of the tokens so far, so
that a decoding step computes attention for its new tokens only."""

from __future__ import annotations

from collections.abc import Sequence
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

    def view(self, rows: list[int], new: int | Sequence[int], static: bool = False) -> SlotView:
        """The cache as one step sees it: `rows` (slot indices, in batch order) each bring `new` tokens: one
        number for all (tokens (B, new)), or one per row (a *packed* step: tokens (1, sum(new)), row after row, so
        that one forward carries prompt chunks and one-token decoding rows together; see `SlotView`).
        `static`: attention reads all `max_len` positions (masked), so every step has the same shapes (a compiled
        step); one new token per row only (the causal mask of several assumes the rows end at the window's end)."""
        counts = [new] * len(rows) if isinstance(new, int) else list(new)
        if any(self.lengths[r] + n > self.max_len for r, n in zip(rows, counts)):
            raise ValueError(f"a row would pass the cache's max_len {self.max_len}")
        if static and new != 1:
            raise ValueError("a static view takes one new token per row")
        return SlotView(self, rows, new, static)


@dataclass
class SlotGroup:
    """Consecutive rows of a packed step, in consecutive slots, that bring the same number of tokens (`count`):
    attention computes them as one batch (rows, heads, count, D) over their keys up to `key_len`. `first`: the group's first token in the
    step; `allowed` (rows, 1, count, key_len): True where a row's query may attend a key (its own cached
    positions and its new tokens up to itself: the causal mask, shifted by each row's own length)."""

    first: int
    rows: list[int]
    count: int
    key_len: int
    index: Tensor
    allowed: Tensor
    mask: Tensor | None = None  # `allowed` as attention's additive mask, made by the first layer, kept for the rest


class SlotView:
    """One step's window on a `SlotCache` (the object attention's `cache.update(layer, k, v)` talks to).
    `starts` (B,): each row's first new position; `positions`: each new token's position (for RoPE or learned
    embeddings), (B, new), or (1, N) when packed.

    Two layouts. Rows of `new` tokens each (an int): tokens are (B, new); `update` writes and returns the rows'
    keys and values up to `key_len`, and `padding` (B, key_len) is True where a key is not (yet) part of the row.
    Packed (`new` a list, one count per row): tokens are (1, N), each row's tokens one after the other, so that a
    step mixes prompt chunks of newcomers with one-token rows of running requests (chunked prefill, as vLLM's and
    SGLang's): the linear layers see N tokens in one matrix product, and attention (`MultiHeadAttention`) computes
    each `SlotGroup` apart with its own per-row causal mask; `last` (B,) is each row's last token in the step."""

    def __init__(self, cache: SlotCache, rows: list[int], new: int | Sequence[int], static: bool = False):
        self.cache, self.rows, self.static = cache, rows, static
        self.packed = not isinstance(new, int)
        self.counts = [new] * len(rows) if isinstance(new, int) else list(new)
        device = cache.keys[0].device
        self.starts = torch.tensor([cache.lengths[r] for r in rows], dtype=torch.long, device=device)
        self.index = torch.tensor(rows, dtype=torch.long, device=device)
        if isinstance(new, int):
            self.key_len = cache.max_len if static else max(cache.lengths[r] for r in rows) + new
            ends = self.starts + new
            self.padding = torch.arange(self.key_len, device=device)[None] >= ends[:, None]
            self.write_at = self.starts[:, None] + torch.arange(new, device=device)[None]  # (B, new)
            self.write_rows = self.index[:, None].expand_as(self.write_at)
            self.positions = self.write_at
            return
        counts = torch.tensor(self.counts, dtype=torch.long, device=device)
        offsets = counts.cumsum(0) - counts  # each row's first token in the step
        total = int(counts.sum())
        within = torch.arange(total, device=device) - offsets.repeat_interleave(counts)
        self.write_at = (self.starts.repeat_interleave(counts) + within)[None]  # (1, N)
        self.write_rows = self.index.repeat_interleave(counts)[None]
        self.positions = self.write_at
        self.last = offsets + counts - 1
        self.groups: list[SlotGroup] = []
        i = 0
        while i < len(rows):
            j = i
            # a group: rows of one count in consecutive slots, whose keys and values attention reads in place
            # (gathering 16 rows of 150 positions costed a decoding step of SmolLM2 a fifth more than their reading)
            while j + 1 < len(rows) and self.counts[j + 1] == self.counts[i] and rows[j + 1] == rows[j] + 1:
                j += 1
            group_rows, count = rows[i : j + 1], self.counts[i]
            starts = self.starts[i : j + 1]
            key_len = int(starts.max()) + count
            query_at = starts[:, None] + torch.arange(count, device=device)[None]  # (rows, count)
            allowed = torch.arange(key_len, device=device)[None, None] <= query_at[:, :, None]
            self.groups.append(SlotGroup(int(offsets[i]), group_rows, count, key_len, self.index[i : j + 1],
                                         allowed[:, None]))
            i = j + 1

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Write the step's new keys and values, k and v (B, Hkv, new, D) or packed (1, Hkv, N, D), at each new
        token's row and position."""
        for buffer, new in ((self.cache.keys[layer], k), (self.cache.values[layer], v)):
            # buffer[row, :, position] for every (row, new position): advanced indices first, then heads, dims.
            buffer.permute(0, 2, 1, 3).index_put_((self.write_rows, self.write_at), new.transpose(1, 2))

    def read(self, layer: int, rows: list[int], index: Tensor, key_len: int) -> tuple[Tensor, Tensor]:
        """The keys and values of `rows` (their slot `index`) up to `key_len`: a slice of the buffer for
        consecutive rows, else gathered."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            sl = slice(rows[0], rows[0] + len(rows))
            return keys[sl, :, :key_len], values[sl, :, :key_len]
        return keys[:, :, :key_len].index_select(0, index), values[:, :, :key_len].index_select(0, index)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, new, D) at each row's length; return the rows' keys and values up to `key_len`
        (rows of one count; a packed step's attention reads each group with `read`)."""
        if self.packed:
            raise ValueError("a packed view is read group by group (MultiHeadAttention does so)")
        self.write(layer, k, v)
        return self.read(layer, self.rows, self.index, self.key_len)

    def commit(self) -> None:
        """After the step: the rows' lengths include the new tokens."""
        for r, n in zip(self.rows, self.counts):
            self.cache.lengths[r] += n
