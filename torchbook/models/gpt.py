"""Decoder-only language models (book chapters 15 and 17): one implementation for GPT-2 and the Llama family.

The config covers GPT-2 (learned positions, LayerNorm, GELU MLP, biases, tied embeddings), Llama (RMSNorm, RoPE,
SwiGLU, grouped-query attention), Qwen2 (query/key/value biases), Mistral (sliding-window attention) and Mixtral
(a mixture of SwiGLU experts with top-k routing and a load-balancing loss). Attention is torchbook's one
`MultiHeadAttention`. Shapes: tokens (B, T) -> hidden (B, T, d_model) -> logits (B, T, vocab).

Decoding follows `torchbook.generate.engine`: `start_decoding(batch_size, attention_mask=None)` makes an empty KV
cache (left-padded prompts: give the prompt's attention mask), `decode_step(tokens, state)` appends tokens and
returns the last position's logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbook.nn.attention import MultiHeadAttention
from torchbook.nn.kv_cache import KVCache, SlotCache, SlotView
from torchbook.nn.norms import RMSNorm
from torchbook.nn.positions import RotaryEmbedding
from torchbook.nn.quantized import concat_linear


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: = n_head (multi-head); 1: multi-query; between: grouped-query
    d_model: int = 768
    d_ff: int = 3072
    head_dim: int | None = None
    max_len: int = 1024
    norm: str = "layernorm"  # layernorm (GPT-2) or rmsnorm (Llama)
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu (GPT-2's tanh approximation) or swiglu (Llama)
    positions: str = "learned"  # learned (GPT-2) or rope (Llama)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # e.g. {"rope_type": "linear", "factor": 2.0}
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    sliding_window: int | None = None  # Mistral
    n_experts: int = 0  # Mixtral: experts per layer (0: a dense MLP)
    experts_per_token: int = 2
    dropout: float = 0.0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head


def rope_inv_freq(config: GPTConfig) -> Tensor:
    """RoPE frequencies with the scaling variants of published checkpoints (none, linear, Llama 3)."""
    head_dim = config.head_dim or config.d_model // config.n_head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":  # long wavelengths slowed down by `factor`, short ones kept, a smooth ramp between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(middle, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported RoPE scaling {kind!r}; supported: default, linear, llama3")
    return inv_freq


class MLP(nn.Module):
    """GPT-2: Linear -> GELU (tanh) -> Linear. Llama: down(silu(gate(x)) * up(x)) (SwiGLU)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.up = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=config.mlp_bias)
        self.gate_up: nn.Module | None = None

    def fuse_gate_up(self) -> None:
        """For inference: the SwiGLU gate and up projections as one matrix product (`gate_up`)."""
        if self.swiglu:
            self.gate_up = concat_linear([self.gate, self.up])
            del self.gate, self.up

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class MixtureOfExperts(nn.Module):
    """Top-k routed SwiGLU experts (Mixtral). The router's softmax weights of the k chosen experts are
    renormalized to sum to 1; `aux_loss` is the load-balancing loss E * sum_e f_e P_e (Switch Transformer),
    where f_e is the fraction of tokens sent to expert e and P_e its mean router probability."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.k = config.experts_per_token
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.gate_up = nn.Parameter(torch.empty(config.n_experts, 2 * config.d_ff, config.d_model))
        self.down = nn.Parameter(torch.empty(config.n_experts, config.d_model, config.d_ff))
        nn.init.normal_(self.gate_up, std=0.02)
        nn.init.normal_(self.down, std=0.02)
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        probs = self.router(x).float().softmax(-1)  # (N, E)
        weights, chosen = probs.topk(self.k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            gate, up = F.linear(x[rows], self.gate_up[e]).chunk(2, dim=-1)
            out.index_add_(0, rows, F.linear(F.silu(gate) * up, self.down[e]) * weights[rows, slot, None])
        n_experts = probs.size(-1)
        routed = F.one_hot(chosen, n_experts).sum(1).float().mean(0)  # f_e (counting each of the k slots)
        self.aux_loss = n_experts * (routed / self.k * probs.mean(0)).sum()
        return out.reshape(shape)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        norm = (lambda: RMSNorm(config.d_model, config.norm_eps)) if config.norm == "rmsnorm" else (
            lambda: nn.LayerNorm(config.d_model, eps=config.norm_eps))
        self.layer = layer
        self.norm_1 = norm()
        self.attn = MultiHeadAttention(config.d_model, config.n_head, config.n_kv_head, config.head_dim,
                                       bias=config.qkv_bias, out_bias=config.out_bias, dropout=config.dropout)
        self.norm_2 = norm()
        self.mlp: nn.Module = MixtureOfExperts(config) if config.n_experts else MLP(config)
        self.window = config.sliding_window
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None, padding: Tensor | None,
                cache: KVCache | SlotView | None, same_document: Tensor | None = None) -> Tensor:
        attended = self.attn(self.norm_1(x), causal=True, key_padding_mask=padding, rotary=rotary,
                             window=self.window, cache=cache, layer=self.layer, attn_mask=same_document)
        x = x + (self.dropout(attended) if self.training else attended)  # dropout is the identity in eval mode:
        transformed = self.mlp(self.norm_2(x))  # not calling it saves time on every decoded token
        return x + (self.dropout(transformed) if self.training else transformed)


@dataclass
class GPTState:
    """Decoding state: the KV cache, each row's padding mask over all tokens so far, and each row's next position.
    `prompt_padding` (B, T_prompt), True where a left-padded prompt is padding, covers the first tokens fed (in
    one step or several), and stays for `fresh()` states, which read the whole sequence again."""

    cache: KVCache
    padding: Tensor  # (B, T_so_far) True where padding
    next_position: Tensor  # (B,)
    prompt_padding: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        self.cache.reorder(index)
        self.padding = self.padding.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)
        if self.prompt_padding is not None:
            self.prompt_padding = self.prompt_padding.index_select(0, index)

    def fresh(self) -> GPTState:
        return GPTState(KVCache(), self.padding[:, :0], torch.zeros_like(self.next_position), self.prompt_padding)


class GPT(nn.Module):
    config_class = GPTConfig
    output_layers = ("lm_head",)  # whose errors go straight into the logits: quantization keeps them at 8 bits
    returns_hidden = True  # forward(..., hidden_only=True): the final hidden states, for losses on chosen positions

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.max_len, config.d_model) if config.positions == "learned" else None
        self.rotary = RotaryEmbedding(config.head_dim or config.d_model // config.n_head,
                                      inv_freq=rope_inv_freq(config)) if config.positions == "rope" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps) if config.norm == "rmsnorm" else nn.LayerNorm(
            config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None, positions: Tensor | None = None,
                cache: KVCache | SlotView | None = None, padding: Tensor | None = None, last_only: bool = False,
                documents: Tensor | None = None, hidden_only: bool = False) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab). `attention_mask` (B, T): 1 for real tokens, 0 for (left) padding.
        `last_only`: logits of the last position only, (B, 1, vocab) (decoding: skips the output layer's work on
        every prompt token, a fifth of a long prompt's prefill for SmolLM2). `documents` (B, T): rows packed with
        several examples (chapter 17's sequence packing), each token's example number: a token attends within its
        example only and positions restart at each example, so each gets the logits it would get alone."""
        same_document = None
        if documents is not None:
            same_document = (documents[:, :, None] == documents[:, None, :])[:, None]  # (B, 1, T, T)
            if positions is None:
                index = torch.arange(tokens.size(1), device=tokens.device)[None].expand_as(documents)
                starts = torch.ones_like(documents, dtype=torch.bool)
                starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
                positions = index - torch.where(starts, index, 0).cummax(-1).values
        if padding is None and attention_mask is not None:
            padding = attention_mask == 0
        if positions is None:
            if attention_mask is not None:  # left padding: real tokens count from 0
                positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            else:
                positions = torch.arange(tokens.size(1), device=tokens.device)[None].expand(tokens.size(0), -1)
        x = self.embed(tokens)
        if self.position is not None:
            x = x + self.position(positions)
        rotary = self.rotary(positions, x.dtype) if self.rotary is not None else None
        x = self.dropout(x)
        static = isinstance(cache, SlotView) and cache.static  # no data-dependent branch in a compiled step
        if padding is not None and not static and not padding.any():
            padding = None
        for block in self.blocks:
            x = block(x, rotary, padding, cache, same_document)
        if last_only:
            x = x[:, -1:]
        if hidden_only:  # the final hidden states (B, T, d_model), before the output layer (`lm_head`)
            return self.norm(x)
        return self.lm_head(self.norm(x))

    def fuse_projections(self) -> GPT:
        """For inference (decoding is faster with fewer, larger matrix products): each block's query/key/value
        projections and its SwiGLU gate/up projections become one layer each. The fused model cannot be saved as
        a Hugging Face checkpoint."""
        for block in self.blocks:
            assert isinstance(block, Block)
            block.attn.fuse_qkv()
            if isinstance(block.mlp, MLP):
                block.mlp.fuse_gate_up()
        return self

    def aux_loss(self) -> Tensor:
        """The mixture-of-experts load-balancing loss of the last forward pass (0 for dense models)."""
        losses = [b.mlp.aux_loss for b in self.blocks if isinstance(b.mlp, MixtureOfExperts)]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    # -- the decoding protocol ------------------------------------------------------------------------------
    def start_decoding(self, batch_size: int, attention_mask: Tensor | None = None) -> GPTState:
        """An empty state. With left-padded prompts, pass their attention mask: it covers the prompt tokens
        that the first `decode_step` call will bring."""
        device = self.embed.weight.device
        return GPTState(KVCache(), torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
                        torch.zeros(batch_size, dtype=torch.long, device=device),
                        None if attention_mask is None else attention_mask.to(device) == 0)

    def decode_step(self, tokens: Tensor, state: GPTState) -> Tensor:
        # Inference mode (no autograd bookkeeping at all) takes about a tenth off a decoding step of a small model;
        # the logits are cloned out of it, so callers may change them in place or keep them for autograd.
        with torch.inference_mode():
            logits = self._decode_step(tokens, state)
        return logits.clone()

    def _decode_step(self, tokens: Tensor, state: GPTState) -> Tensor:
        new, done = tokens.size(1), state.padding.size(1)
        new_padding = torch.zeros(tokens.size(0), new, dtype=torch.bool, device=tokens.device)
        if state.prompt_padding is not None and done < state.prompt_padding.size(1):  # (part of) the prompt
            prompt_part = state.prompt_padding[:, done : done + new]
            new_padding[:, : prompt_part.size(1)] = prompt_part
        real = (~new_padding).long()
        positions = state.next_position[:, None] + (real.cumsum(-1) - 1).clamp_min(0)
        state.padding = torch.cat([state.padding, new_padding], dim=1)
        logits = self(tokens, positions=positions, cache=state.cache, padding=state.padding, last_only=True)
        state.next_position = state.next_position + real.sum(-1)
        return logits[:, -1]

    # -- serving: many requests side by side in a preallocated cache (torchbook.generate.serving) ------------
    @property
    def supports_slots(self) -> bool:
        """Whether `slot_step` serves this model (a sliding window's mask assumes rows of one length)."""
        return self.config.sliding_window is None

    supports_packed_steps = True  # slot_step takes a packed view: prompt chunks and decoding rows in one forward

    def new_slot_cache(self, slots: int, max_len: int) -> SlotCache:
        """A `SlotCache` of `slots` rows of `max_len` positions for this model's layers."""
        head_dim = self.config.head_dim or self.config.d_model // self.config.n_head
        weight = self.embed.weight
        return SlotCache(self.config.n_layer, slots, min(max_len, self.config.max_len), self.config.kv_heads,
                         head_dim, weight.dtype, weight.device)

    def slot_step(self, tokens: Tensor, view: SlotView, all_positions: bool = False) -> Tensor:
        """tokens (B, T) for the rows of `view` (T > 1: a prompt chunk, of one row or rows of one length), or
        (1, N) for a packed view (each row's new tokens one after the other: prompt chunks beside one-token
        decoding rows, in one forward) -> the (B, vocab) logits of each row's last new position, or with
        `all_positions` the logits of every new position, (B, T, vocab) or packed (N, vocab) (speculative decoding
        verifies T draft tokens in one pass). Each row reads only its own cached positions."""
        with torch.inference_mode():
            if view.packed:
                hidden = self(tokens, positions=view.positions, cache=view, hidden_only=True)[0]
                logits = self.lm_head(hidden if all_positions else hidden[view.last])
            else:
                logits = self(tokens, positions=view.positions, cache=view, padding=view.padding,
                              last_only=not all_positions)
                if not all_positions:
                    logits = logits[:, -1]
        view.commit()
        return logits.clone()
