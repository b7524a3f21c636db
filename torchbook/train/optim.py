"""Optimizers and learning-rate schedules by name (book chapter 11), built from a TrainConfig.

Schedules are stepped once per optimizer step; `plateau` is stepped once per epoch with the monitored metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from torchbook.train.config import OPTIMIZER_NAMES, SCHEDULE_NAMES, TrainConfig, monitor_mode


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


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """With l1, l2 or max_norm set, two groups (chapter 11): "weights" (matrices and kernels, ndim >= 2) carry the
    L1/L2 penalties and max-norm; "biases_and_norms" (vectors: biases, normalization scales) carry none. Each group
    keeps its own `l1`, `l2` and `max_norm` keys, which the trainer reads at every step, so a caller can change
    them per group. Without any of them, one group "all".
    `weight_decay` (the optimizer's own decay) applies to both groups, as torch does by default."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not (config.l1 or config.l2 or config.max_norm):  # one group: one optimizer kernel per step (faster)
        return [{"params": params, "name": "all", "l1": 0.0, "l2": 0.0, "max_norm": 0.0}]
    weights = [p for p in params if p.ndim >= 2]
    others = [p for p in params if p.ndim < 2]
    groups = [
        {"params": weights, "name": "weights", "l1": config.l1, "l2": config.l2, "max_norm": config.max_norm},
        {"params": others, "name": "biases_and_norms", "l1": 0.0, "l2": 0.0, "max_norm": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[config.optimizer](parameter_groups(model, config), config)


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
    """Exponential scheduling (chapter 11): lr(t) = lr0 * 0.1^(t/s), s = decay_steps (default: the whole run)."""
    return _warmup(step, c.warmup_steps) * 0.1 ** (step / max(1, c.decay_steps or total))


def _cosine_restarts(step: int, c: TrainConfig, total: int) -> float:
    """Cosine annealing with warm restarts (SGDR, Loshchilov & Hutter 2017), after an optional linear warm-up:
    cycles of restart_steps, restart_steps*restart_mult, ... steps, each decaying from lr to 0 along a half cosine."""
    if step < c.warmup_steps:
        return _warmup(step, c.warmup_steps)
    t = step - c.warmup_steps
    period = c.restart_steps or max(1, (total - c.warmup_steps) // 10)
    while t >= period:
        t -= period
        period *= c.restart_mult
    return 0.5 * (1.0 + math.cos(math.pi * t / period))


def _onecycle(opt: torch.optim.Optimizer, c: TrainConfig, total: int) -> Any:
    """1cycle (Smith 2018): lr rises from lr/25 to lr over the first 30% of the steps (or warmup_steps), then
    anneals to lr/25e4; momentum (SGD) or beta1 (Adam family) cycles the other way."""
    total = max(2, total)
    pct_start = min(0.99, c.warmup_steps / total) if c.warmup_steps else 0.3
    cycle_momentum = "momentum" in opt.defaults and c.momentum > 0 or "betas" in opt.defaults
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=c.lr, total_steps=total, pct_start=pct_start, cycle_momentum=cycle_momentum
    )


def _plateau(opt: torch.optim.Optimizer, c: TrainConfig, total: int) -> Any:
    """Performance scheduling: multiply lr by plateau_factor when `monitor` has not improved for plateau_patience
    epochs (stepped once per epoch with the monitored value)."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min" if monitor_mode(c.monitor) == "min" else "max", factor=c.plateau_factor, patience=c.plateau_patience
    )


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, TrainConfig, int], Any]] = {
    "constant": _lambda_schedule(_constant),
    "cosine": _lambda_schedule(_cosine),
    "warmup": _lambda_schedule(_inverse_sqrt),
    "exponential": _lambda_schedule(_exponential),
    "cosine_restarts": _lambda_schedule(_cosine_restarts),
    "onecycle": _onecycle,
    "plateau": _plateau,
}

PER_EPOCH_SCHEDULES = {"plateau"}
assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES and tuple(SCHEDULES) == SCHEDULE_NAMES, "update train/config.py's names"


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    return SCHEDULES[config.schedule](optimizer, config, total_steps)
