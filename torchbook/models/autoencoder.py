"""Autoencoders (book chapter 18): stacked (dense), convolutional, and the variational autoencoder.

Denoising and sparse autoencoders are these same networks trained differently (noise on the inputs; a sparsity
penalty on the codings): see `torchbook.train.generative.autoencoder_step`.

- `Autoencoder`: encoder (B, H, W) -> codings (B, codings), decoder codings -> (B, H, W) in [0, 1] (sigmoid).
  `dense`: flatten, [Linear + activation] * hidden, Linear to the codings (sigmoid codings when `sparse`);
  `conv`: two stride-2 convolutions (28 -> 14 -> 7), flatten, Linear to the codings; the decoder mirrors it with
  transposed convolutions.
- `VAE`: a dense encoder to the mean and log-variance of a Gaussian over the codings, a sample drawn with the
  reparameterization trick (z = mean + exp(log_var / 2) * noise), the dense decoder. `forward` gives
  (reconstruction, mean, log_var).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from torchbook.models.mlp import ACTIVATIONS

KINDS = ("dense", "conv", "vae")


@dataclass
class AutoencoderConfig:
    kind: str = "dense"  # dense, conv, vae
    image_size: list[int] = field(default_factory=lambda: [28, 28])
    hidden: list[int] = field(default_factory=lambda: [128])  # dense and vae encoders (the decoders mirror them)
    channels: list[int] = field(default_factory=lambda: [16, 32])  # conv: the two stride-2 convolutions
    codings: int = 32
    activation: str = "relu"
    sparse: bool = False  # sigmoid codings, for the KL sparsity penalty

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown autoencoder kind {self.kind!r}; accepted: {', '.join(KINDS)}")


def dense_stack(sizes: list[int], activation: str) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    return layers


def dense_decoder(config: AutoencoderConfig) -> nn.Sequential:
    """codings -> [Linear + activation] * reversed(hidden) -> Linear -> sigmoid -> (B, H, W)."""
    h, w = config.image_size
    sizes = [config.codings, *reversed(config.hidden)]
    return nn.Sequential(*dense_stack(sizes, config.activation), nn.Linear(sizes[-1], h * w), nn.Sigmoid(),
                         nn.Unflatten(1, (h, w)))


class Autoencoder(nn.Module):
    """A dense or convolutional autoencoder: `encode`, `decode`, and `forward` = decode(encode(x))."""

    config_class = AutoencoderConfig

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        h, w = config.image_size
        pixels = h * w
        act = config.activation
        codings_act: list[nn.Module] = [nn.Sigmoid()] if config.sparse else []
        if config.kind == "conv":
            c1, c2 = config.channels
            flat = c2 * (h // 4) * (w // 4)
            self.encoder = nn.Sequential(
                nn.Unflatten(1, (1, h)),  # (B, H, W) -> (B, 1, H, W)
                nn.Conv2d(1, c1, 3, stride=2, padding=1), ACTIVATIONS[act](),
                nn.Conv2d(c1, c2, 3, stride=2, padding=1), ACTIVATIONS[act](),
                nn.Flatten(), nn.Linear(flat, config.codings), *codings_act)
            self.decoder = nn.Sequential(
                nn.Linear(config.codings, flat), ACTIVATIONS[act](), nn.Unflatten(1, (c2, h // 4, w // 4)),
                nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1), ACTIVATIONS[act](),
                nn.ConvTranspose2d(c1, 1, 3, stride=2, padding=1, output_padding=1), nn.Sigmoid(),
                nn.Flatten(1, 2))  # (B, 1, H, W) -> (B, H, W)
        else:
            sizes = [pixels, *config.hidden]
            self.encoder = nn.Sequential(nn.Flatten(), *dense_stack(sizes, act), nn.Linear(sizes[-1], config.codings),
                                         *codings_act)
            self.decoder = dense_decoder(config)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, codings: Tensor) -> Tensor:
        return self.decoder(codings)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


class VAE(nn.Module):
    """The variational autoencoder: forward(x) -> (reconstruction, mean, log_var) of the codings."""

    config_class = AutoencoderConfig

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        h, w = config.image_size
        sizes = [h * w, *config.hidden]
        self.encoder = nn.Sequential(nn.Flatten(), *dense_stack(sizes, config.activation))
        self.mean = nn.Linear(sizes[-1], config.codings)
        self.log_var = nn.Linear(sizes[-1], config.codings)
        self.decoder = dense_decoder(config)

    def encode(self, x: Tensor) -> Tensor:
        """The codings' mean: the deterministic code of an image (for embeddings and classifiers)."""
        return self.mean(self.encoder(x))

    def decode(self, codings: Tensor) -> Tensor:
        return self.decoder(codings)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden = self.encoder(x)
        mean, log_var = self.mean(hidden), self.log_var(hidden)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)  # the reparameterization trick
        return self.decode(z), mean, log_var


class EncoderClassifier(nn.Module):
    """A classifier on an autoencoder's encoder: codings -> Linear -> class logits (unsupervised pretraining when
    the autoencoder was trained first). Only the encoder takes part; the decoder stays unused."""

    def __init__(self, autoencoder: Autoencoder | VAE, n_classes: int):
        super().__init__()
        self.autoencoder = autoencoder
        self.head = nn.Linear(autoencoder.config.codings, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.autoencoder.encode(x))
