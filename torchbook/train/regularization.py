"""Regularization of chapter 11 for every model: L1/L2 penalties per parameter group, max-norm, MC dropout.

The penalties are added to the gradients rather than to the loss: the gradient of l1*sum|w| + l2*sum w^2 is
l1*sign(w) + 2*l2*w, added once per optimizer step after the micro-batches. It is the same update as adding the
penalty to the loss, and it works unchanged on sharded (FSDP) parameters, since it is elementwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torchbook.train.distributed import local


@torch.no_grad()
def add_penalty_gradients(optimizer: torch.optim.Optimizer) -> None:
    """grad += l1 * sign(w) + 2 * l2 * w for every parameter, with each param group's own `l1` and `l2`."""
    for group in optimizer.param_groups:
        l1, l2 = group.get("l1", 0.0), group.get("l2", 0.0)
        if not (l1 or l2):
            continue
        for param in group["params"]:
            if param.grad is None:
                continue
            grad, weight = local(param.grad), local(param)
            if l2:
                grad.add_(weight, alpha=2 * l2)
            if l1:
                grad.add_(weight.sign(), alpha=l1)


def penalty(optimizer: torch.optim.Optimizer) -> float:
    """The value of the penalties (for reports): sum over groups of l1*sum|w| + l2*sum w^2 (local shard only)."""
    total = 0.0
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                w = local(param).float()
                total += group.get("l1", 0.0) * w.abs().sum().item() + group.get("l2", 0.0) * w.pow(2).sum().item()
    return total


@torch.no_grad()
def apply_max_norm(optimizer: torch.optim.Optimizer) -> None:
    """Max-norm regularization: rescale each neuron's incoming weights (each row of a Linear weight, each output
    channel of a convolution kernel) whose L2 norm exceeds the group's `max_norm`. Rows are never split across
    FSDP shards (they shard along dim 0), so each process rescales its own rows."""
    for group in optimizer.param_groups:
        max_norm = group.get("max_norm", 0.0)
        if not max_norm:
            continue
        for param in group["params"]:
            if param.ndim >= 2:
                weight = local(param)
                if weight.numel():
                    weight.copy_(torch.renorm(weight, p=2, dim=0, maxnorm=max_norm))


def _dropout_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


@torch.no_grad()
def mc_dropout(
    model: nn.Module,
    inputs: tuple[Any, ...],
    samples: int = 30,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Monte Carlo dropout (Gal & Ghahramani 2016; chapter 11): the model in eval mode except its dropout layers,
    `samples` stochastic forward passes, and the mean and standard deviation of `transform(output)` over them
    (e.g. `transform=lambda z: z.softmax(-1)` for class probabilities). Batch norm keeps its running statistics."""
    if samples < 1:
        raise ValueError(f"samples={samples} must be at least 1")
    was_training = model.training
    model.eval()
    dropouts = _dropout_layers(model)
    for layer in dropouts:
        layer.train()
    try:
        outputs = []
        for _ in range(samples):
            out = model(*inputs).float()
            outputs.append(transform(out) if transform is not None else out)
        stacked = torch.stack(outputs)
    finally:
        model.train(was_training)
    return stacked.mean(0), stacked.std(0, unbiased=False) if samples > 1 else torch.zeros_like(stacked[0])
