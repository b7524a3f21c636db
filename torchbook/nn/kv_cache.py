"""The KV cache of incremental decoding (book chapter 17): each layer's keys and values of the tokens so far, so
that a decoding step computes attention for its new tokens only."""

from __future__ import annotations

from dataclasses import dataclass, field

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
