"""A small U-Net that predicts the noise of a diffusion model (book chapter 18).

The network the book describes for DDPM: convolutional down-sampling and up-sampling paths joined by skip
connections, residual blocks that add a sinusoidal embedding of the time step (like a Transformer's positional
encoding), self-attention at the coarser resolutions, and here a class embedding added to the time embedding for
classifier-free guidance (one extra class index is "no class").

Its layout and module names are those of diffusers' `UNet2DModel`, for the block types listed in `BLOCK_TYPES`
(so a Hugging Face `UNet2DModel` checkpoint of those blocks loads with its own weight names, see
`torchbook.diffusion.pretrained`, and the benchmark's peer is the same network). Reading order: the time
embedding, a residual block, an attention block, the down and up stages, the model.

Shapes: sample (B, C, H, W), timestep (B,) or a scalar, class_labels (B,) -> predicted noise (B, C_out, H, W).
H and W must be divisible by 2^(len(block_out_channels) - 1) (28 works with three stages: 28, 14, 7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
BLOCK_TYPES = DOWN_BLOCKS + UP_BLOCKS + ("UNetMidBlock2D",)


@dataclass
class UNetConfig:
    sample_size: int = 28
    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    down_block_types: list[str] = field(default_factory=lambda: ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    norm_eps: float = 1e-5
    dropout: float = 0.0
    num_class_embeds: int | None = None  # classes + 1 (the last index: no class), for classifier-free guidance
    add_attention: bool = True  # self-attention in the middle block
    flip_sin_to_cos: bool = True
    freq_shift: int = 0

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"{n} block_out_channels need {n} down and {n} up block types")
        unknown = [b for b in (*self.down_block_types, *self.up_block_types) if b not in DOWN_BLOCKS + UP_BLOCKS]
        if unknown:
            raise ValueError(f"unsupported U-Net block types {unknown}; supported: {', '.join(BLOCK_TYPES)}")


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0,
                       max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal encoding of the time step (B,) -> (B, dim): the Transformer's positional encoding, per step."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """The sinusoidal encoding through a small MLP: (B, channels) -> (B, 4 * channels)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the projected time embedding, GroupNorm -> SiLU -> dropout -> conv, plus the
    (1x1-projected when the width changes) input."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with GroupNorm first and a residual."""

    def __init__(self, channels: int, head_dim: int, groups: int, eps: float):
        super().__init__()
        self.heads = channels // head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).view(B, H * W, self.heads, C // self.heads).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))  # (B, heads, HW, head_dim)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        h = self.to_out[1](self.to_out[0](h))
        return h.transpose(1, 2).reshape(B, C, H, W) + x


class Downsample2D(nn.Module):
    """A stride-2 3x3 convolution: half the height and width."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour doubling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """`layers` residual blocks (each followed by attention in an Attn block), then a down-sampling (except the
    last stage). Returns the output and every intermediate map, which the up path takes as skip connections."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, layers: int, downsample: bool,
                 config: UNetConfig, temb_channels: int):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps,
                          config.dropout) for i in range(layers))
        if kind == "AttnDownBlock2D":
            self.attentions = nn.ModuleList(
                AttentionBlock(out_channels, config.attention_head_dim, groups, eps) for _ in range(layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x: Tensor, temb: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """`layers` residual blocks, each taking the previous output concatenated with one skip map (each followed
    by attention in an Attn block), then an up-sampling (except the last stage)."""

    def __init__(self, kind: str, skip_channels: list[int], prev_channels: int, out_channels: int, upsample: bool,
                 config: UNetConfig, temb_channels: int):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_channels if i == 0 else out_channels) + skip, out_channels, temb_channels, groups, eps,
                          config.dropout) for i, skip in enumerate(skip_channels))
        if kind == "AttnUpBlock2D":
            self.attentions = nn.ModuleList(
                AttentionBlock(out_channels, config.attention_head_dim, groups, eps) for _ in skip_channels)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class MidBlock(nn.Module):
    """At the coarsest resolution: residual block, self-attention, residual block."""

    def __init__(self, channels: int, config: UNetConfig, temb_channels: int):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels, groups, eps, config.dropout) for _ in range(2))
        if config.add_attention:
            self.attentions = nn.ModuleList([AttentionBlock(channels, config.attention_head_dim, groups, eps)])

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        if hasattr(self, "attentions"):
            x = self.attentions[0](x)
        return self.resnets[1](x, temb)


class UNet(nn.Module):
    """The noise predictor: eps_theta(x_t, t[, class]). See the module docstring for shapes."""

    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        widths = list(config.block_out_channels)
        temb_channels = widths[0] * 4
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], temb_channels)
        self.class_embedding = (nn.Embedding(config.num_class_embeds, temb_channels)
                                if config.num_class_embeds else None)
        self.down_blocks = nn.ModuleList()
        skip_channels = [widths[0]]  # the channels of every map the down path keeps for the up path
        for i, kind in enumerate(config.down_block_types):
            last = i == len(widths) - 1
            self.down_blocks.append(DownBlock(kind, widths[max(i - 1, 0)], widths[i], config.layers_per_block,
                                              not last, config, temb_channels))
            skip_channels += [widths[i]] * (config.layers_per_block + (0 if last else 1))
        self.mid_block = MidBlock(widths[-1], config, temb_channels)
        self.up_blocks = nn.ModuleList()
        prev = widths[-1]
        for i, kind in enumerate(config.up_block_types):
            out = widths[-1 - i]
            skips = [skip_channels.pop() for _ in range(config.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(kind, skips, prev, out, i < len(widths) - 1, config, temb_channels))
            prev = out
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, widths[0], eps=config.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, sample: Tensor, timestep: Tensor | int, class_labels: Tensor | None = None) -> Tensor:
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0],
                                                      self.config.flip_sin_to_cos, self.config.freq_shift))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this U-Net is class-conditional: give class_labels (the last index is no class)")
            temb = temb + self.class_embedding(class_labels)
        x = self.conv_in(sample)
        skips = [x]
        for down in self.down_blocks:
            x, kept = down(x, temb)
            skips += kept
        x = self.mid_block(x, temb)
        for up in self.up_blocks:
            x = up(x, skips, temb)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))
