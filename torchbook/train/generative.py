"""Training steps of the generative models (book chapter 18), for the one trainer (`Trainer(step=...)`).

- `denoising_step`: DDPM's objective. Draw a time step t and Gaussian noise for each image, jump straight to
  x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, and train the model to predict the noise (the book uses
  a Huber loss); with classes, each label is replaced by "no class" with probability `p_uncond` so that one model
  learns both the conditional and the unconditional noise (classifier-free guidance).

Randomness comes from torch's global generator, which the trainer seeds and checkpoints, so a resumed run draws the
same t and noise as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchbook.train.trainer import Step, StepFn

LOSSES = ("huber", "mse", "mae")


def noise_loss(pred: Tensor, target: Tensor, loss: str) -> Tensor:
    if loss == "huber":
        return F.huber_loss(pred, target)
    if loss == "mse":
        return F.mse_loss(pred, target)
    return F.l1_loss(pred, target)


def to_model_scale(images: Tensor) -> Tensor:
    """Pixels in [0, 1], (B, H, W) or (B, C, H, W) -> [-1, 1], (B, C, H, W): the scale diffusion works in."""
    images = images.float()
    return (images[:, None] if images.dim() == 3 else images) * 2 - 1


def denoising_step(alphas_cumprod: Tensor, loss: str = "huber", p_uncond: float = 0.0,
                   null_class: int | None = None) -> StepFn:
    """A `Trainer` step for `(images, labels)` batches of pixels in [0, 1]: the noise-prediction loss at random t.

    `alphas_cumprod` (T,) is the schedule's alpha_bar (`torchbook.diffusion.schedulers`); `null_class` the model's
    "no class" index (None: an unconditional model, labels ignored)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; accepted: {', '.join(LOSSES)}")

    def step(model: nn.Module, batch: Any) -> Step:
        images, labels = batch
        x0 = to_model_scale(images)
        alpha_bar_all = alphas_cumprod.to(x0.device)
        t = torch.randint(0, len(alpha_bar_all), (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        alpha_bar = alpha_bar_all[t].view(-1, 1, 1, 1)
        x_t = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise
        if null_class is None:
            pred = model(x_t, t)
        else:
            drop = torch.rand(len(labels), device=labels.device) < p_uncond
            pred = model(x_t, t, torch.where(drop, torch.full_like(labels, null_class), labels))
        return Step(noise_loss(pred, noise, loss), count=len(x0))

    return step
