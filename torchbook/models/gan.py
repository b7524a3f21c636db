"""Generative adversarial networks (book chapter 18): the dense GAN and DCGAN.

`GAN` holds a generator (codings (B, codings) -> images (B, H, W) in [-1, 1], tanh) and a discriminator (images ->
one logit: real or fake), plus a `phase` buffer the training step flips between "train the discriminator" and
"train the generator" (it is saved with the weights, so an interrupted run resumes on the right phase).

- `dense`: generator codings-128-256-pixels (the book's sizes for its GAN; 32 codings), discriminator
  pixels-256-128-1 (sizes ours).
- `dcgan`: the DCGAN guidelines (Radford et al.): a dense layer to 128 x H/4 x W/4, two stride-2 transposed
  convolutions with batch normalization and ReLU in the generator; stride-2 convolutions, batch normalization and
  leaky ReLU, no pooling, in the discriminator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

KINDS = ("dense", "dcgan")


@dataclass
class GANConfig:
    kind: str = "dense"
    image_size: list[int] = field(default_factory=lambda: [28, 28])
    codings: int = 32
    generator_hidden: list[int] = field(default_factory=lambda: [128, 256])  # dense
    discriminator_hidden: list[int] = field(default_factory=lambda: [256, 128])  # dense
    channels: list[int] = field(default_factory=lambda: [64, 128])  # dcgan: the two convolution widths

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown GAN kind {self.kind!r}; accepted: {', '.join(KINDS)}")


def dense_generator(config: GANConfig) -> nn.Sequential:
    h, w = config.image_size
    layers: list[nn.Module] = []
    width = config.codings
    for size in config.generator_hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, h * w), nn.Tanh(), nn.Unflatten(1, (h, w)))


def dense_discriminator(config: GANConfig) -> nn.Sequential:
    h, w = config.image_size
    layers: list[nn.Module] = [nn.Flatten()]
    width = h * w
    for size in config.discriminator_hidden:
        layers += [nn.Linear(width, size), nn.LeakyReLU(0.2)]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 1))


def dcgan_generator(config: GANConfig) -> nn.Sequential:
    h, w = config.image_size
    c1, c2 = config.channels
    return nn.Sequential(
        nn.Linear(config.codings, c2 * (h // 4) * (w // 4)), nn.Unflatten(1, (c2, h // 4, w // 4)),
        nn.BatchNorm2d(c2), nn.ReLU(),
        nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),  # H/2
        nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1), nn.Tanh(),  # H
        nn.Flatten(1, 2))


def dcgan_discriminator(config: GANConfig) -> nn.Sequential:
    h, w = config.image_size
    c1, c2 = config.channels
    return nn.Sequential(
        nn.Unflatten(1, (1, h)),
        nn.Conv2d(1, c1, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # H/2
        nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.BatchNorm2d(c2), nn.LeakyReLU(0.2),  # H/4
        nn.Flatten(), nn.Linear(c2 * (h // 4) * (w // 4), 1))


class GAN(nn.Module):
    """forward(codings) = the generator's images in [-1, 1]; `discriminator(images)` gives logits (B, 1)."""

    config_class = GANConfig

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        dense = config.kind == "dense"
        self.generator = dense_generator(config) if dense else dcgan_generator(config)
        self.discriminator = dense_discriminator(config) if dense else dcgan_discriminator(config)
        self.phase: Tensor
        self.register_buffer("phase", torch.zeros((), dtype=torch.long))  # 0: discriminator's turn, 1: generator's

    def forward(self, codings: Tensor) -> Tensor:
        return self.generator(codings)
