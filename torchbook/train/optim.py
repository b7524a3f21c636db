"""Optimizers and learning-rate schedules by name (book chapter 11), built from a TrainConfig.

Schedules are stepped once per optimizer step; `plateau` is stepped once per epoch with the monitored metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from torchbook.train.config import TrainConfig


def _sgd(params: Iterable[Any], c: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay)


OPTIMIZERS: dict[str, Callable[[Iterable[Any], TrainConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay),
    "nadam": lambda p, c: torch.optim.NAdam(p, lr=c.lr, weight_decay=c.weight_decay),
    "adamax": lambda p, c: torch.optim.Adamax(p, lr=c.lr, weight_decay=c.weight_decay),
    "rmsprop": lambda p, c: torch.optim.RMSprop(p, lr=c.lr, alpha=0.9, momentum=c.momentum, weight_decay=c.weight_decay),
    "adagrad": lambda p, c: torch.optim.Adagrad(p, lr=c.lr, weight_decay=c.weight_decay),
}


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[config.optimizer](params, config)


def _warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _lambda_schedule(
    factor: Callable[[int, TrainConfig, int], float],
) -> Callable[[torch.optim.Optimizer, TrainConfig, int], Any]:
    """A schedule given as lr(step) / lr, stepped once per optimizer step."""

    def build(optimizer: torch.optim.Optimizer, config: TrainConfig, total: int) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step, config, total))

    return build


def _constant(step: int, c: TrainConfig, total: int) -> float:
    return _warmup(step, c.warmup_steps)


def _cosine(step: int, c: TrainConfig, total: int) -> float:
    """Linear warm-up, then cosine decay to 0 at the last step."""
    if step < c.warmup_steps:
        return _warmup(step, c.warmup_steps)
    progress = (step - c.warmup_steps) / max(1, total - c.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _inverse_sqrt(step: int, c: TrainConfig, total: int) -> float:
    """The original Transformer's schedule (Vaswani et al., eq. 3), relative to lr: rises linearly for
    warmup_steps, peaks at lr, then decays as 1/sqrt(step)."""
    warmup = max(1, c.warmup_steps)
    s = step + 1
    return min(s / warmup, math.sqrt(warmup / s))


def _exponential(step: int, c: TrainConfig, total: int) -> float:
    """Exponential scheduling (chapter 11): lr drops by 10x over the whole run, lr(t) = lr0 * 0.1^(t/total)."""
    return _warmup(step, c.warmup_steps) * 0.1 ** (step / max(1, total))


def _onecycle(opt: torch.optim.Optimizer, c: TrainConfig, total: int) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=max(1, total))


def _plateau(opt: torch.optim.Optimizer, c: TrainConfig, total: int) -> Any:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2)


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, TrainConfig, int], Any]] = {
    "constant": _lambda_schedule(_constant),
    "cosine": _lambda_schedule(_cosine),
    "warmup": _lambda_schedule(_inverse_sqrt),
    "exponential": _lambda_schedule(_exponential),
    "onecycle": _onecycle,
    "plateau": _plateau,
}

PER_EPOCH_SCHEDULES = {"plateau"}


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    return SCHEDULES[config.schedule](optimizer, config, total_steps)
