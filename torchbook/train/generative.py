"""Training steps of the generative models (book chapter 18), for the one trainer (`Trainer(step=...)`).

- `denoising_step`: DDPM's objective. Draw a time step t and Gaussian noise for each image, jump straight to
  x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, and train the model to predict the noise (the book uses
  a Huber loss); with classes, each label is replaced by "no class" with probability `p_uncond` so that one model
  learns both the conditional and the unconditional noise (classifier-free guidance).

Randomness comes from torch's global generator, which the trainer seeds and checkpoints, so a resumed run draws the
same t and noise as an uninterrupted one.
"""

from __future__ import annotations

import copy
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


class EMAModel(nn.Module):
    """A model beside an exponential moving average of its weights, the copy DDPM samples with (Ho et al., 2020).

    `forward` runs the trained model; `update()` (after each optimizer step: the `EMAUpdate` callback) moves the
    average towards it: ema = k ema + (1 - k) weights, k = min(decay, (1 + n) / (10 + n)) after n updates (the
    warm-up of diffusers' `EMAModel`, so that a short run is not dominated by its random initial weights). The
    average is a frozen submodule, so the trainer's optimizer leaves it alone and its checkpoints carry it (exact
    resume)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"decay={decay} must be between 0 and 1")
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.updates: Tensor
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def update(self) -> None:
        self.updates.add_(1)
        n = int(self.updates)
        k = min(self.decay, (1 + n) / (10 + n))
        for average, weight in zip(self.ema.parameters(), self.model.parameters(), strict=True):
            average.lerp_(weight, 1 - k)
        for average_buffer, buffer in zip(self.ema.buffers(), self.model.buffers(), strict=True):
            average_buffer.copy_(buffer)


class EMAUpdate:
    """Trainer callback: `update()` the `EMAModel` being trained after every optimizer step."""

    def on_step_end(self, trainer: Any, loss: Any) -> None:
        trainer.model.update()


def kl_sparsity(codings: Tensor, target: float) -> Tensor:
    """The sparse autoencoder's penalty (chapter 18): KL divergence between a target activation probability p and
    each coding unit's mean activation q over the batch, summed over the units:
    p log(p / q) + (1 - p) log((1 - p) / (1 - q))."""
    q = codings.mean(0).clamp(1e-7, 1 - 1e-7)
    p = torch.full_like(q, target)
    return (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum()


def vae_kl(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL divergence of the codings' Gaussian from the standard normal, summed over the codings, averaged over the
    batch: -1/2 sum(1 + log_var - exp(log_var) - mean^2)."""
    return (-0.5 * (1 + log_var - log_var.exp() - mean.square()).sum(-1)).mean()


def corrupt(images: Tensor, noise: str, level: float) -> Tensor:
    """Denoising autoencoders' input noise: `gaussian` adds N(0, level^2), `dropout` zeroes pixels with probability
    `level` (scaling the others by 1 / (1 - level), as dropout does), `none` leaves the images."""
    if noise == "gaussian":
        return images + level * torch.randn_like(images)
    if noise == "dropout":
        return F.dropout(images, level, training=True)
    return images


def autoencoder_step(noise: str = "none", noise_level: float = 0.0, sparsity_target: float = 0.0,
                     sparsity_weight: float = 0.0, kl_weight: float = 0.0) -> StepFn:
    """A `Trainer` step for `(images, labels)` batches (labels unused): the reconstruction MSE of an autoencoder,
    with input noise while training (denoising), a KL sparsity penalty on the codings (sparse), or, for a VAE
    (a model whose forward returns (reconstruction, mean, log_var)), `kl_weight` times the KL term (the book's
    VAE loss: MSE + KL / 784, so kl_weight = 1 / pixels)."""

    def step(model: nn.Module, batch: Any) -> Step:
        images, _ = batch
        inputs = corrupt(images, noise, noise_level) if model.training else images
        if kl_weight:
            reconstruction, mean, log_var = model(inputs)
            loss = F.mse_loss(reconstruction, images) + kl_weight * vae_kl(mean, log_var)
        elif sparsity_weight:
            autoencoder: Any = model  # an Autoencoder: encode() and decode()
            codings = autoencoder.encode(inputs)
            loss = F.mse_loss(autoencoder.decode(codings), images) + sparsity_weight * kl_sparsity(codings, sparsity_target)
        else:
            loss = F.mse_loss(model(inputs), images)
        return Step(loss, count=len(images))

    return step


class GANStep:
    """Alternating GAN updates (chapter 18) as a `Trainer` step, for a `torchbook.models.gan.GAN`.

    Each real batch comes twice in a row (the recipe's `batches` for the trainer lists it twice): the first time it trains
    the discriminator (real images -> 1, or 1 - `label_smoothing`, the book's one-sided smoothing trick; fresh fakes,
    detached from the generator -> 0), the second time the generator (fresh fakes that the discriminator should call
    real, its weights held fixed so only the generator learns). The model's `phase` buffer says whose turn it is and
    flips each call. The trainer's one optimizer then updates only the parameters that received gradients (the
    trainer sets gradients to None after each step, and torch's optimizers skip parameters without one), so the two
    players alternate exactly as in the book's loop, with one learning rate. `losses` keeps each player's losses of
    the current epoch for the report's diagnostics."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing
        self.losses: dict[str, list[float]] = {"discriminator": [], "generator": []}

    def __call__(self, model: nn.Module, batch: Any) -> Step:
        from torch.func import functional_call

        gan: Any = model
        images, _ = batch
        real = images.float() * 2 - 1  # the generator's tanh range
        codings = torch.randn(len(real), gan.config.codings, device=real.device)
        ones = torch.ones(len(real), device=real.device)
        if int(gan.phase) == 0:
            fake = gan.generator(codings).detach()
            loss = (F.binary_cross_entropy_with_logits(gan.discriminator(real)[:, 0], ones - self.label_smoothing)
                    + F.binary_cross_entropy_with_logits(gan.discriminator(fake)[:, 0], torch.zeros_like(ones)))
            player = "discriminator"
        else:
            frozen = {name: p.detach() for name, p in gan.discriminator.named_parameters()}
            logits = functional_call(gan.discriminator, frozen, (gan.generator(codings),))
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], ones)
            player = "generator"
        gan.phase.fill_(1 - int(gan.phase))
        self.losses[player].append(float(loss.detach()))
        return Step(loss, count=len(real))

