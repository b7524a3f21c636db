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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbook.nn.attention import KVCache, MultiHeadAttention
from torchbook.nn.norms import RMSNorm
from torchbook.nn.positions import RotaryEmbedding


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
            from torchbook.nn.quantized import concat_linear

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
                cache: KVCache | None) -> Tensor:
        attended = self.attn(self.norm_1(x), causal=True, key_padding_mask=padding, rotary=rotary,
                             window=self.window, cache=cache, layer=self.layer)
        x = x + (self.dropout(attended) if self.training else attended)  # dropout is the identity in eval mode:
        transformed = self.mlp(self.norm_2(x))  # not calling it saves time on every decoded token
        return x + (self.dropout(transformed) if self.training else transformed)


@dataclass
class GPTState:
    """Decoding state: the KV cache, each row's padding mask over all tokens so far, and each row's next position."""

    cache: KVCache
    padding: Tensor  # (B, T_so_far) True where padding
    next_position: Tensor  # (B,)

    def reorder(self, index: Tensor) -> None:
        self.cache.reorder(index)
        self.padding = self.padding.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)

    def fresh(self) -> GPTState:
        return GPTState(KVCache(), self.padding[:, :0], torch.zeros_like(self.next_position))


class GPT(nn.Module):
    config_class = GPTConfig

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
                cache: KVCache | None = None, padding: Tensor | None = None, last_only: bool = False) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab). `attention_mask` (B, T): 1 for real tokens, 0 for (left) padding.
        `last_only`: logits of the last position only, (B, 1, vocab) (decoding: skips the output layer's work on
        every prompt token, a fifth of a long prompt's prefill for SmolLM2)."""
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
        if padding is not None and not padding.any():
            padding = None
        for block in self.blocks:
            x = block(x, rotary, padding, cache)
        if last_only:
            x = x[:, -1:]
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
        state = GPTState(KVCache(), torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
                         torch.zeros(batch_size, dtype=torch.long, device=device))
        state.pending_mask = attention_mask  # type: ignore[attr-defined]
        return state

    def decode_step(self, tokens: Tensor, state: GPTState) -> Tensor:
        # Inference mode (no autograd bookkeeping at all) takes about a tenth off a decoding step of a small model;
        # the logits are cloned out of it, so callers may change them in place or keep them for autograd.
        with torch.inference_mode():
            logits = self._decode_step(tokens, state)
        return logits.clone()

    def _decode_step(self, tokens: Tensor, state: GPTState) -> Tensor:
        new = tokens.size(1)
        mask = getattr(state, "pending_mask", None)
        if mask is not None and state.padding.size(1) == 0 and mask.size(1) == new:
            new_padding = mask == 0
        else:
            new_padding = torch.zeros(tokens.size(0), new, dtype=torch.bool, device=tokens.device)
        real = (~new_padding).long()
        positions = state.next_position[:, None] + (real.cumsum(-1) - 1).clamp_min(0)
        state.padding = torch.cat([state.padding, new_padding], dim=1)
        logits = self(tokens, positions=positions, cache=state.cache, padding=state.padding, last_only=True)
        state.next_position = state.next_position + real.sum(-1)
        return logits[:, -1]

    @torch.no_grad()
    def generate(self, tokens: Tensor, max_new_tokens: int, eos_id: int | None = None,
                 attention_mask: Tensor | None = None, use_cache: bool = True) -> Tensor:
        """Greedy continuation through the shared engine: (B, T) -> (B, max_new_tokens) new tokens."""
        from torchbook.generate.engine import decode

        state = self.start_decoding(tokens.size(0), attention_mask=attention_mask)
        out = decode(self, state, tokens, max_new_tokens, eos_id=-1 if eos_id is None else eos_id, use_cache=use_cache)
        return out.tokens


# -- Hugging Face checkpoints ----------------------------------------------------------------------------------
SUPPORTED = ("gpt2", "llama", "qwen2", "mistral", "mixtral")


def config_from_hf(hf: Any) -> GPTConfig:
    """Our config from a transformers config (GPT-2, Llama, Qwen2, Mistral, Mixtral)."""
    kind = hf.model_type
    if kind == "gpt2":
        return GPTConfig(hf.vocab_size, hf.n_layer, hf.n_head, None, hf.n_embd, hf.n_inner or 4 * hf.n_embd, None,
                         hf.n_positions, "layernorm", hf.layer_norm_epsilon, "gelu", "learned",
                         tie_embeddings=True)
    if kind not in SUPPORTED:
        raise ValueError(f"unsupported architecture {kind!r}; supported: {', '.join(SUPPORTED)}")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") == "default":
        rope = {}
    return GPTConfig(
        vocab_size=hf.vocab_size, n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
        n_kv_head=hf.num_key_value_heads, d_model=hf.hidden_size, d_ff=hf.intermediate_size,
        head_dim=getattr(hf, "head_dim", None), max_len=hf.max_position_embeddings, norm="rmsnorm",
        norm_eps=hf.rms_norm_eps, mlp="swiglu", positions="rope", rope_theta=theta, rope_scaling=rope,
        qkv_bias=kind == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        out_bias=bool(getattr(hf, "attention_bias", False)), mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tie_embeddings=bool(hf.tie_word_embeddings),
        sliding_window=getattr(hf, "sliding_window", None) if kind in ("mistral",) else None,
        n_experts=getattr(hf, "num_local_experts", 0) if kind == "mixtral" else 0,
        experts_per_token=getattr(hf, "num_experts_per_tok", 2),
    )


def fuse_legacy_experts(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mixtral checkpoints on disk keep one (w1 = gate, w3 = up, w2 = down) per expert under `block_sparse_moe`;
    transformers (and we) hold them fused: gate_up (E, 2 d_ff, d) and down (E, d, d_ff)."""
    if not any(".block_sparse_moe." in k for k in sd):
        return sd
    out = {k: v for k, v in sd.items() if ".block_sparse_moe." not in k}
    layers = sorted({k.split(".")[2] for k in sd if ".block_sparse_moe." in k}, key=int)
    for layer in layers:
        p = f"model.layers.{layer}.block_sparse_moe."
        n = len({k.split(".")[5] for k in sd if k.startswith(p + "experts.")})
        out[f"model.layers.{layer}.mlp.gate.weight"] = sd[p + "gate.weight"]
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[p + f"experts.{e}.w1.weight"], sd[p + f"experts.{e}.w3.weight"]]) for e in range(n)])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([sd[p + f"experts.{e}.w2.weight"] for e in range(n)])
    return out


def state_dict_from_hf(sd: dict[str, Tensor], config: GPTConfig, kind: str) -> dict[str, Tensor]:
    """Rename (and for GPT-2, split and transpose) a Hugging Face state dict into ours."""
    out: dict[str, Tensor] = {}
    if kind == "gpt2":
        d = config.d_model
        out["embed.weight"], out["position.weight"] = sd["transformer.wte.weight"], sd["transformer.wpe.weight"]
        out["norm.weight"], out["norm.bias"] = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
        for i in range(config.n_layer):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
                out[q + ours + ".weight"], out[q + ours + ".bias"] = sd[p + theirs + ".weight"], sd[p + theirs + ".bias"]
            w, b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]  # Conv1D: (in, out)
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[q + f"attn.{name}.weight"] = w[:, j * d : (j + 1) * d].t()
                out[q + f"attn.{name}.bias"] = b[j * d : (j + 1) * d]
            out[q + "attn.out_proj.weight"] = sd[p + "attn.c_proj.weight"].t()
            out[q + "attn.out_proj.bias"] = sd[p + "attn.c_proj.bias"]
            out[q + "mlp.up.weight"], out[q + "mlp.up.bias"] = sd[p + "mlp.c_fc.weight"].t(), sd[p + "mlp.c_fc.bias"]
            out[q + "mlp.down.weight"] = sd[p + "mlp.c_proj.weight"].t()
            out[q + "mlp.down.bias"] = sd[p + "mlp.c_proj.bias"]
        out["lm_head.weight"] = sd.get("lm_head.weight", out["embed.weight"])
        return out
    sd = fuse_legacy_experts(sd)
    renames = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
               "self_attn.o_proj": "attn.out_proj", "input_layernorm": "norm_1", "post_attention_layernorm": "norm_2",
               "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down",
               "mlp.gate": "mlp.router", "mlp.experts.gate_up_proj": "mlp.gate_up", "mlp.experts.down_proj": "mlp.down"}
    for name, tensor in sd.items():
        if name == "model.embed_tokens.weight":
            out["embed.weight"] = tensor
        elif name == "model.norm.weight":
            out["norm.weight"] = tensor
        elif name == "lm_head.weight":
            out["lm_head.weight"] = tensor
        elif name.startswith("model.layers."):
            layer, rest = name.split(".", 3)[2:]
            module, _, param = rest.rpartition(".")
            if module == "mlp.experts" or rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
                module, param = rest, ""
            if module not in renames:
                raise KeyError(f"unexpected tensor {name!r} in the checkpoint")
            out[f"blocks.{layer}.{renames[module]}" + (f".{param}" if param else "")] = tensor
        elif "rotary_emb" not in name:
            raise KeyError(f"unexpected tensor {name!r} in the checkpoint")
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def state_dict_to_hf(model: GPT, kind: str) -> dict[str, Tensor]:
    """Our state dict under Hugging Face's names (the inverse of `state_dict_from_hf`)."""
    sd, config = model.state_dict(), model.config
    out: dict[str, Tensor] = {}
    if kind == "gpt2":
        out["transformer.wte.weight"], out["transformer.wpe.weight"] = sd["embed.weight"], sd["position.weight"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
        for i in range(config.n_layer):
            p, q = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
                out[p + theirs + ".weight"], out[p + theirs + ".bias"] = sd[q + ours + ".weight"], sd[q + ours + ".bias"]
            out[p + "attn.c_attn.weight"] = torch.cat([sd[q + f"attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]).t()
            out[p + "attn.c_attn.bias"] = torch.cat([sd[q + f"attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")])
            out[p + "attn.c_proj.weight"], out[p + "attn.c_proj.bias"] = sd[q + "attn.out_proj.weight"].t(), sd[q + "attn.out_proj.bias"]
            out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = sd[q + "mlp.up.weight"].t(), sd[q + "mlp.up.bias"]
            out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = sd[q + "mlp.down.weight"].t(), sd[q + "mlp.down.bias"]
        return {k: v.contiguous() for k, v in out.items()}
    back = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
            "attn.out_proj": "self_attn.o_proj", "norm_1": "input_layernorm", "norm_2": "post_attention_layernorm",
            "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj", "mlp.router": "mlp.gate"}
    for name, tensor in sd.items():
        if name == "embed.weight":
            out["model.embed_tokens.weight"] = tensor
        elif name == "norm.weight":
            out["model.norm.weight"] = tensor
        elif name == "lm_head.weight":
            if not config.tie_embeddings:
                out["lm_head.weight"] = tensor
        elif name.startswith("blocks."):
            layer, rest = name.split(".", 2)[1:]
            if config.n_experts and rest in ("mlp.gate_up", "mlp.down", "mlp.router.weight"):
                p = f"model.layers.{layer}.block_sparse_moe."  # the on-disk layout of Mixtral checkpoints
                if rest == "mlp.router.weight":
                    out[p + "gate.weight"] = tensor
                for e in range(config.n_experts):
                    if rest == "mlp.gate_up":
                        out[p + f"experts.{e}.w1.weight"], out[p + f"experts.{e}.w3.weight"] = tensor[e].chunk(2)
                    elif rest == "mlp.down":
                        out[p + f"experts.{e}.w2.weight"] = tensor[e]
                continue
            module, _, param = rest.rpartition(".")
            out[f"model.layers.{layer}.{back[module]}.{param}"] = tensor
    return {k: v.contiguous() for k, v in out.items()}


def hf_config_dict(config: GPTConfig) -> dict[str, Any]:
    """A transformers config.json for our config (GPT-2 or the Llama family)."""
    if config.positions == "learned":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
                "n_embd": config.d_model, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.d_ff,
                "n_positions": config.max_len, "layer_norm_epsilon": config.norm_eps, "activation_function": "gelu_new",
                "tie_word_embeddings": True}
    kind = "mixtral" if config.n_experts else "mistral" if config.sliding_window else "qwen2" if config.qkv_bias else "llama"
    out: dict[str, Any] = {
        "model_type": kind, "architectures": [f"{kind.capitalize() if kind != 'qwen2' else 'Qwen2'}ForCausalLM"],
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim or config.d_model // config.n_head, "max_position_embeddings": config.max_len,
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default", **config.rope_scaling},
        "attention_bias": config.out_bias, "mlp_bias": config.mlp_bias,
    }
    if config.sliding_window:
        out["sliding_window"] = config.sliding_window
    if config.n_experts:
        out.update(num_local_experts=config.n_experts, num_experts_per_tok=config.experts_per_token)
    return out


def save_hf(model: GPT, folder: str | Path, tokenizer: Any = None) -> Path:
    """Write `model` as a Hugging Face folder (config.json + model.safetensors [+ tokenizer.json])."""
    from safetensors.torch import save

    from torchbook.io import atomic_write, atomic_write_json
    from torchbook.nn.quantized import check_savable

    check_savable(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(model.config)
    tensors = state_dict_to_hf(model, config["model_type"])
    payload = save(tensors, metadata={"format": "pt"})
    atomic_write(folder / "model.safetensors", lambda f: f.write(payload))
    atomic_write_json(folder / "config.json", config)
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def load_hf_folder(folder: str | Path) -> GPT:
    """Our GPT from a Hugging Face folder (config.json + *.safetensors), without importing the transformers model."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig

    from torchbook.errors import CheckpointError

    folder = Path(folder)
    try:
        kind = json.loads((folder / "config.json").read_text())["model_type"]
        hf_config = AutoConfig.from_pretrained(str(folder))
        config = config_from_hf(hf_config)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{str(folder)!r}: {e}") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{str(folder)!r} holds no *.safetensors weights")
    sd: dict[str, Tensor] = {}
    for file in files:
        sd.update(load_file(str(file)))
    model = GPT(config)
    try:
        state = state_dict_from_hf(sd, config, kind)
    except KeyError as e:
        raise CheckpointError(f"{str(folder)!r}: {e.args[0]}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{str(folder)!r} does not match the model: missing tensors {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval()


def from_hf_model(hf_model: Any) -> GPT:
    """Our GPT with the weights of a loaded transformers causal LM."""
    config = config_from_hf(hf_model.config)
    model = GPT(config)
    state = state_dict_from_hf(hf_model.state_dict(), config, hf_model.config.model_type)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
