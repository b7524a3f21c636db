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
    # Chapter 11's options (the defaults keep PyTorch's layers as they are):
    init: str = "default"  # default (PyTorch's), glorot, he or lecun (normal, fan-in or average fan), zero biases
    batch_norm: bool = False  # Linear (no bias) -> BatchNorm1d -> activation in every hidden layer
    alpha_dropout: bool = False  # AlphaDropout instead of Dropout (keeps SELU's self-normalization)


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


INITS = ("default", "glorot", "he", "lecun")


def initialize(layer: nn.Linear, init: str) -> None:
    """Chapter 11's initializations: Glorot (normal, variance 2 / (fan_in + fan_out)), He (2 / fan_in, for ReLU)
    and LeCun (1 / fan_in, for SELU); biases start at zero. `default` keeps PyTorch's uniform initialization."""
    if init == "default":
        return
    if init == "glorot":
        nn.init.xavier_normal_(layer.weight)
    elif init == "he":
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    elif init == "lecun":
        nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
    else:
        raise ValueError(f"unknown init {init!r}; accepted: {', '.join(INITS)}")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class MLP(nn.Module):
    """x (B, ...) -> flatten -> standardize -> [Linear -> (BatchNorm) -> activation -> dropout] * len(hidden)
    -> Linear -> (B, out). A self-normalizing net (chapter 11) is activation=selu, init=lecun, alpha_dropout=True
    on standardized inputs."""

    config_class = MLPConfig

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.standardize = Standardize(config.in_features) if config.standardize else nn.Identity()
        layers: list[nn.Module] = []
        width = config.in_features
        for size in config.hidden:
            linear = nn.Linear(width, size, bias=not config.batch_norm)
            initialize(linear, config.init)
            layers.append(linear)
            if config.batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(ACTIVATIONS[config.activation]())
            if config.dropout:
                layers.append(nn.AlphaDropout(config.dropout) if config.alpha_dropout else nn.Dropout(config.dropout))
            width = size
        output = nn.Linear(width, config.out_features)
        initialize(output, "glorot" if config.init != "default" else "default")
        layers.append(output)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.standardize(x.flatten(1)))
