"""Vision transformer (book chapter 16; Dosovitskiy et al. 2020), on torchbook's own transformer blocks.

An image (B, C, H, W) is cut into P x P patches, each linearly embedded (a stride-P convolution), a learned class
token is prepended (and DeiT's distillation token, with `distillation_token=True`), learned position embeddings
are added, and a stack of pre-norm encoder layers (`torchbook.nn.transformer.Encoder`: multi-head self-attention
and a GELU MLP, each with a residual connection) ends with a LayerNorm; the class token's output goes through
the classifier. ViT-B/16 is patch 16, width 768, 12 layers, 12 heads, MLP 3072 (the defaults).

`attention_maps(x)` gives every layer's attention weights (recomputed from the same projections: the fused
attention kernel does not return them); `attention_rollout` combines them across layers (Abnar & Zuidema 2020).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from torchbook.models.cnn import PixelNorm
from torchbook.nn.drop import linear_rates
from torchbook.nn.transformer import Encoder, EncoderLayer


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    n_classes: int = 1000
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth: the last layer's rate, rising linearly from 0
    eps: float = 1e-12  # LayerNorm epsilon (Hugging Face's ViT)
    distillation_token: bool = False  # DeiT: a second learned token after the class token
    distillation_head: bool = False  # DeiT with teacher: the output averages the two tokens' classifiers
    pixel_mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    pixel_std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        """Leading tokens before the patches: the class token, and DeiT's distillation token."""
        return 2 if self.distillation_token else 1


class ViT(nn.Module):
    config_class = ViTConfig

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        c = config
        self.norm = PixelNorm(c.pixel_mean, c.pixel_std)
        self.patch_embed = nn.Conv2d(c.in_channels, c.d_model, c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.d_model)) if c.distillation_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, c.n_tokens + c.grid**2, c.d_model))
        self.dropout = nn.Dropout(c.dropout)
        self.encoder = Encoder(c.n_layers, c.d_model, c.n_heads, c.d_ff, c.dropout, norm_first=True,
                               final_norm=True, activation="gelu", eps=c.eps)
        for layer, rate in zip(self.encoder.layers, linear_rates(c.drop_path, c.n_layers)):
            layer.drop_path = rate  # type: ignore[assignment]
        self.head = nn.Linear(c.d_model, c.n_classes)
        self.dist_head = nn.Linear(c.d_model, c.n_classes) if c.distillation_head else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) tokens, positions and linear weights, zero biases, as ViT and DeiT do."""
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def embed(self, x: Tensor) -> Tensor:
        """Pixels (B, C, H, W) -> token embeddings with positions (B, n_tokens + grid^2, d_model)."""
        patches = self.patch_embed(self.norm(x)).flatten(2).transpose(1, 2)  # (B, grid^2, d_model)
        tokens = [self.cls_token.expand(len(patches), -1, -1)]
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand(len(patches), -1, -1))
        return self.dropout(torch.cat([*tokens, patches], dim=1) + self.pos_embed)

    def encode(self, x: Tensor) -> Tensor:
        """The final LayerNorm's output for every token, (B, n_tokens + grid^2, d_model)."""
        return self.encoder(self.embed(x))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) or (B, H, W) pixels -> logits (B, n_classes)."""
        h = self.encode(x)
        logits = self.head(h[:, 0])
        if self.dist_head is not None:  # DeiT at inference: the mean of the class and distillation classifiers
            logits = (logits + self.dist_head(h[:, 1])) / 2
        return logits

    @torch.no_grad()
    def attention_maps(self, x: Tensor) -> Tensor:
        """Attention weights of every layer, (n_layers, B, n_heads, T, T), softmax(QK^T / sqrt(d)) (equation 15-1)
        computed from each layer's own query/key projections of the input it receives."""
        inputs: list[Tensor] = []
        hooks = [layer.self_attn.register_forward_pre_hook(  # type: ignore[union-attr]
            lambda _m, args: inputs.append(args[0])) for layer in self.encoder.layers]
        try:
            self.encode(x)
        finally:
            for hook in hooks:
                hook.remove()
        maps = []
        for layer, h in zip(self.encoder.layers, inputs):
            assert isinstance(layer, EncoderLayer)
            attn = layer.self_attn
            q = attn.split_heads(attn.q_proj(h), attn.n_heads)
            k = attn.split_heads(attn.k_proj(h), attn.n_kv_heads)
            maps.append((q @ k.transpose(-2, -1) / attn.head_dim**0.5).softmax(-1))
        return torch.stack(maps)


def attention_rollout(maps: Tensor, n_tokens: int = 1) -> Tensor:
    """Attention rollout: average the heads, add the residual (identity), renormalize, multiply through the layers.
    maps: (n_layers, B, H, T, T) -> (B, n_patches): how much the class token's output draws on each patch."""
    eye = torch.eye(maps.size(-1), device=maps.device)
    joint = eye.expand_as(maps[0, :, 0])
    for layer in maps:
        a = layer.mean(1) + eye
        joint = (a / a.sum(-1, keepdim=True)) @ joint
    return joint[:, 0, n_tokens:]
