"""Convolutional networks (book chapter 12): the book's Fashion-MNIST CNN and ResNet (ResNet-34 by default).

Both take images (B, C, H, W), or (B, H, W) for one channel, with pixels in [0, 1]; the per-channel input
normalization (`pixel_mean`, `pixel_std`) is part of the model, so a saved model takes raw pixels.

`FashionCNN` is the chapter's stack: a 7x7 convolution with 64 filters, max pooling, then two blocks of two 3x3
convolutions (128 then 256 filters) each followed by max pooling, then dense layers 128-64-classes with dropout 0.5.

`ResNet` follows He et al. (2015) as the chapter builds it: a 7x7 stride-2 stem with max pooling, then stages of
residual units (two 3x3 convolutions with batch norm, or 1x1-3x3-1x1 bottlenecks), where the first unit of each
stage after the first halves the resolution and doubles the width, with a 1x1 convolution on the skip connection;
then global average pooling and a dense output layer. ResNet-34 is stages of 3, 4, 6 and 3 basic units of 64, 128,
256 and 512 channels. Module layout maps one to one onto Hugging Face's `ResNetForImageClassification`
(see `torchbook.hub.vision`).

`ConvNeXt` (for Hugging Face ConvNeXt checkpoints): a patchify stem, stages of depthwise 7x7 convolutions with
inverted-bottleneck MLPs and LayerNorm, downsampling between stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from torchbook.nn.drop import DropPath, linear_rates


class PixelNorm(nn.Module):
    """(x - mean) / std per channel, with the statistics fixed in the config (saved with the model)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # (B, H, W): one channel
            x = x.unsqueeze(1)
        return (x - self.mean) / self.std


# -- the book's Fashion-MNIST CNN -------------------------------------------------------------------------------
@dataclass
class FashionCNNConfig:
    in_channels: int = 1
    n_classes: int = 10
    image_size: int = 28
    filters: list[int] = field(default_factory=lambda: [64, 128, 256])  # first conv, then the two 2-conv blocks
    dense: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.5
    pixel_mean: list[float] = field(default_factory=lambda: [0.0])
    pixel_std: list[float] = field(default_factory=lambda: [1.0])


class FashionCNN(nn.Module):
    """Chapter 12's CNN: conv7x7(64) pool, [conv3x3(128) x2] pool, [conv3x3(256) x2] pool, dense 128-64-classes."""

    config_class = FashionCNNConfig

    def __init__(self, config: FashionCNNConfig):
        super().__init__()
        self.config = config
        first, *blocks = config.filters
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, first, 7, padding="same"), nn.ReLU(), nn.MaxPool2d(2)]
        width, size = first, config.image_size // 2
        for filters in blocks:
            layers += [nn.Conv2d(width, filters, 3, padding="same"), nn.ReLU(),
                       nn.Conv2d(filters, filters, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2)]
            width, size = filters, size // 2
        self.norm = PixelNorm(config.pixel_mean, config.pixel_std)
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten()]
        in_features = width * size * size
        for units in config.dense:
            head += [nn.Linear(in_features, units), nn.ReLU(), nn.Dropout(config.dropout)]
            in_features = units
        head.append(nn.Linear(in_features, config.n_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) or (B, H, W) pixels -> logits (B, n_classes)."""
        return self.head(self.features(self.norm(x)))


# -- ResNet ---------------------------------------------------------------------------------------------------
@dataclass
class ResNetConfig:
    in_channels: int = 3
    n_classes: int = 1000
    stem_width: int = 64
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3])  # ResNet-34
    block: str = "basic"  # basic (two 3x3 convolutions) or bottleneck (1x1, 3x3, 1x1 with a 4x narrower middle)
    downsample_in_first_stage: bool = False  # the first stage keeps the stem's resolution (as He et al.)
    downsample_in_bottleneck: bool = False  # stride on the first 1x1 (v1) rather than the 3x3 (v1.5)
    drop_path: float = 0.0  # stochastic depth: the last unit's rate, rising linearly from 0
    pixel_mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    pixel_std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    """A convolution without bias (batch norm follows, with its own shift) and its batch norm."""
    return [nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels)]


class ResidualUnit(nn.Module):
    """The book's residual unit: relu(main(x) + skip(x)). `main` is conv-BN-ReLU-conv-BN (basic) or
    1x1-BN-ReLU-3x3-BN-ReLU-1x1-BN (bottleneck); `skip` is the identity, or a 1x1 convolution with batch norm
    when the unit changes the resolution or the width."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, block: str = "basic",
                 downsample_in_bottleneck: bool = False, drop_path: float = 0.0):
        super().__init__()
        if block == "basic":
            main = [*conv_bn(in_channels, out_channels, 3, stride), nn.ReLU(), *conv_bn(out_channels, out_channels, 3)]
        else:
            middle = out_channels // 4
            first_stride, middle_stride = (stride, 1) if downsample_in_bottleneck else (1, stride)
            main = [*conv_bn(in_channels, middle, 1, first_stride), nn.ReLU(),
                    *conv_bn(middle, middle, 3, middle_stride), nn.ReLU(), *conv_bn(middle, out_channels, 1)]
        self.main = nn.Sequential(*main)
        needs_projection = stride != 1 or in_channels != out_channels
        self.skip = nn.Sequential(*conv_bn(in_channels, out_channels, 1, stride)) if needs_projection else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.drop_path(self.main(x)) + self.skip(x))


class ResNet(nn.Module):
    """stem (conv7x7/2, BN, ReLU, maxpool3x3/2) -> stages of residual units -> global average pool -> Linear."""

    config_class = ResNetConfig

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        self.norm = PixelNorm(config.pixel_mean, config.pixel_std)
        self.stem = nn.Sequential(*conv_bn(config.in_channels, config.stem_width, 7, 2), nn.ReLU(),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        rates = iter(linear_rates(config.drop_path, sum(config.depths)))
        stages = []
        width = config.stem_width
        for s, (out_width, depth) in enumerate(zip(config.widths, config.depths)):
            stride = 2 if s > 0 or config.downsample_in_first_stage else 1
            units = []
            for u in range(depth):
                units.append(ResidualUnit(width, out_width, stride if u == 0 else 1, config.block,
                                          config.downsample_in_bottleneck, next(rates)))
                width = out_width
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, config.n_classes)

    def features(self, x: Tensor) -> Tensor:
        """Pooled features (B, widths[-1]), what transfer learning reuses."""
        return self.pool(self.stages(self.stem(self.norm(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def resnet34(in_channels: int = 3, n_classes: int = 1000, **overrides: object) -> ResNet:
    """ResNet-34 (stages 3/4/6/3 of basic units), the chapter's from-scratch ResNet."""
    return ResNet(ResNetConfig(in_channels=in_channels, n_classes=n_classes,
                               pixel_mean=[0.0] * in_channels, pixel_std=[1.0] * in_channels, **overrides))  # type: ignore[arg-type]


# -- ConvNeXt -------------------------------------------------------------------------------------------------
@dataclass
class ConvNeXtConfig:
    """ConvNeXt (Liu et al. 2022), a ResNet modernized with a transformer's habits; ConvNeXt-T is the default."""

    in_channels: int = 3
    n_classes: int = 1000
    patch_size: int = 4  # the stem: a patch_size x patch_size convolution with the same stride
    widths: list[int] = field(default_factory=lambda: [96, 192, 384, 768])
    depths: list[int] = field(default_factory=lambda: [3, 3, 9, 3])
    layer_scale: float = 1e-6  # initial per-channel scale of each block's output (0 = none)
    drop_path: float = 0.0
    eps: float = 1e-12  # the final LayerNorm's (the inner ones use 1e-6, as the paper)
    pixel_mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    pixel_std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """x + drop_path(scale * Linear(GELU(Linear(LayerNorm(depthwise 7x7 conv(x)))))): one 7x7 depthwise
    convolution mixes space, then an inverted-bottleneck MLP (4x wider) mixes channels, as a transformer block."""

    def __init__(self, width: int, layer_scale: float, drop_path: float):
        super().__init__()
        self.dwconv = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pwconv1 = nn.Linear(width, 4 * width)
        self.pwconv2 = nn.Linear(4 * width, width)
        self.scale = nn.Parameter(torch.full((width,), layer_scale)) if layer_scale > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        h = self.pwconv2(torch.nn.functional.gelu(self.pwconv1(h)))
        if self.scale is not None:
            h = self.scale * h
        return x + self.drop_path(h.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """stem (patchify conv + LayerNorm) -> stages (a LayerNorm + 2x2 stride-2 conv between them) -> global average
    pool -> LayerNorm -> Linear."""

    config_class = ConvNeXtConfig

    def __init__(self, config: ConvNeXtConfig):
        super().__init__()
        self.config = config
        c = config
        self.norm = PixelNorm(c.pixel_mean, c.pixel_std)
        self.stem = nn.Sequential(nn.Conv2d(c.in_channels, c.widths[0], c.patch_size, stride=c.patch_size),
                                  ChannelNorm(c.widths[0], eps=1e-6))
        rates = iter(linear_rates(c.drop_path, sum(c.depths)))
        self.stages = nn.ModuleList()
        for s, (width, depth) in enumerate(zip(c.widths, c.depths)):
            down: list[nn.Module] = [] if s == 0 else [ChannelNorm(c.widths[s - 1], eps=1e-6),
                                                       nn.Conv2d(c.widths[s - 1], width, 2, stride=2)]
            blocks = [ConvNeXtBlock(width, c.layer_scale, next(rates)) for _ in range(depth)]
            self.stages.append(nn.Sequential(*down, *blocks))
        self.final_norm = nn.LayerNorm(c.widths[-1], eps=c.eps)
        self.head = nn.Linear(c.widths[-1], c.n_classes)

    def features(self, x: Tensor) -> Tensor:
        h = self.stem(self.norm(x))
        for stage in self.stages:
            h = stage(h)
        return self.final_norm(h.mean((-2, -1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
