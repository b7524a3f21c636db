"""Stochastic depth (Huang et al. 2016; "drop path"): during training, skip a residual branch for whole examples.

Each example's branch output is zeroed with probability `p` and the survivors are scaled by 1/(1-p), so the
expected output is unchanged and evaluation needs no rescaling (the same trick as dropout, chapter 11). ResNets
and vision transformers use it with a rate that grows linearly with depth.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """x: (B, ...) the output of a residual branch; zeroed per example with probability p while training."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = torch.empty((x.size(0),) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def linear_rates(max_rate: float, n: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 (first block) to `max_rate` (last block)."""
    return [max_rate * i / max(1, n - 1) for i in range(n)]
