"""What an image classifier looks at: gradient saliency, integrated gradients and occlusion.

- Saliency (Simonyan et al. 2013): |d logit_target / d pixel|, the largest over channels.
- Integrated gradients (Sundararajan et al. 2017): (x - x') times the average gradient along the straight path
  from a baseline x' (black image) to x, by the trapezoid rule over `steps` intervals. Its *completeness* axiom:
  the attributions sum to logit(x) - logit(x'), which the tests check.
- Occlusion (Zeiler & Fergus 2013): how much the target logit drops when a window of pixels is set to `fill`.

Every function takes a model in eval mode, images (B, C, H, W) and target classes (B,), and returns maps (B, H, W)
(integrated gradients: (B, C, H, W), summed over channels by `pixel_map`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn


def _target_logits(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    return model(x).gather(1, target[:, None]).squeeze(1)


def saliency(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_target_logits(model, x, target).sum(), x)
    return grad.abs().amax(1)


def integrated_gradients(model: nn.Module, x: Tensor, target: Tensor, baseline: Tensor | None = None,
                         steps: int = 64) -> Tensor:
    """Attributions (B, C, H, W) whose sum is logit(x) - logit(baseline) up to the quadrature error."""
    baseline = torch.zeros_like(x) if baseline is None else baseline
    alphas = torch.linspace(0, 1, steps + 1, device=x.device)
    weights = torch.full((steps + 1,), 1.0 / steps, device=x.device)
    weights[0] = weights[-1] = 0.5 / steps  # the trapezoid rule
    total = torch.zeros_like(x)
    for alpha, weight in zip(alphas, weights):
        point = (baseline + alpha * (x - baseline)).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_target_logits(model, point, target).sum(), point)
        total += weight * grad
    return (x - baseline) * total


@torch.no_grad()
def occlusion(model: nn.Module, x: Tensor, target: Tensor, window: int = 4, stride: int = 2,
              fill: float = 0.0) -> Tensor:
    """The drop of the target logit when each window x window square is filled with `fill`, averaged over the
    windows covering each pixel: (B, H, W)."""
    base = _target_logits(model, x, target)
    height, width = x.shape[-2:]
    heat = torch.zeros(x.size(0), height, width, device=x.device)
    hits = torch.zeros(height, width, device=x.device)
    for top in range(0, height - window + 1, stride):
        for left in range(0, width - window + 1, stride):
            occluded = x.clone()
            occluded[..., top : top + window, left : left + window] = fill
            drop = base - _target_logits(model, occluded, target)
            heat[:, top : top + window, left : left + window] += drop[:, None, None]
            hits[top : top + window, left : left + window] += 1
    return heat / hits.clamp_min(1)


def pixel_map(attributions: Tensor) -> Tensor:
    """(B, C, H, W) attributions -> (B, H, W), summed over channels."""
    return attributions.sum(1)


def attribution_plot(path: str | Path, images: np.ndarray, maps: dict[str, np.ndarray], titles: list[str]) -> Path:
    """One column per image: the image, then each method's map (red: for the class, blue: against)."""
    from torchbook.plots import plt, save_figure

    rows = 1 + len(maps)
    fig, axes = plt.subplots(rows, len(images), figsize=(1.6 * len(images), 1.7 * rows), squeeze=False)
    for i, image in enumerate(images):
        axes[0, i].imshow(image, cmap="gray")
        axes[0, i].set_title(titles[i], fontsize=7)
        for r, (name, values) in enumerate(maps.items(), start=1):
            scale = float(np.abs(values[i]).max()) or 1.0
            axes[r, i].imshow(values[i], cmap="bwr", vmin=-scale, vmax=scale)
            if i == 0:
                axes[r, i].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)
