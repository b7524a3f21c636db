"""Multilayer perceptrons (book chapters 9-10): the regression MLP and the image-classification MLP.

The input standardization is part of the model (buffers `mean` and `std`, like a normalization layer), so a
saved model takes raw features and `torchbook.load` gives back something ready to predict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "mish": nn.Mish,
}


@dataclass
class MLPConfig:
    in_features: int
    out_features: int
    hidden: list[int] = field(default_factory=lambda: [50, 40])
    activation: str = "relu"
    dropout: float = 0.0
    standardize: bool = True  # fit per-feature mean/std on the training set (off for images already in [0, 1])


class Standardize(nn.Module):
    """(x - mean) / std with statistics fitted on the training set and saved with the model."""

    def __init__(self, n_features: int):
        super().__init__()
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    @torch.no_grad()
    def fit(self, x: Tensor) -> Standardize:
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-8))
        return self

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    """x (B, ...) -> flatten -> standardize -> [Linear -> activation -> dropout] * len(hidden) -> Linear -> (B, out)."""

    config_class = MLPConfig

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.standardize = Standardize(config.in_features) if config.standardize else nn.Identity()
        layers: list[nn.Module] = []
        width = config.in_features
        for size in config.hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[config.activation]()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = size
        layers.append(nn.Linear(width, config.out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.standardize(x.flatten(1)))
