"""The variance schedule and the DDPM and DDIM update rules (book chapter 18, equations 18-7 and 18-9).

Timesteps are indexed as diffusers indexes them: `t = 0 .. T-1`, where `t` is the book's step `t + 1` (the book
counts from 1, keeping its step 0 for the clean image). "Before step 0" is the clean image, whose cumulative alpha
is 1: `alpha_bar(-1) = 1`. A model is always called with this `t`.

Two modes, chosen per sampler:

- `book`: the book's formulas. DDPM: x' = (x - beta_t / sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_t) + sqrt(beta_t) z
  (no noise at the last step). DDIM: x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t),
  x' = sqrt(a') x0 + sqrt(1 - a' - var) eps + sqrt(var) z with the book's variance
  var = eta * (1 - a') / (1 - a_t) * beta_t (eta scales the variance, and beta_t is the one-step beta at t), over
  `steps` equal jumps from the noisiest step to the clean image.
- `diffusers`: the arithmetic of diffusers' `DDPMScheduler` (variance_type fixed_large, clip_sample False,
  epsilon prediction) and `DDIMScheduler` (set_alpha_to_one, clip_sample False), operation for operation, so that
  with the same model outputs and the same generator the samples agree to float32 rounding. DDIM's variance there is
  eta^2 * (1 - a') / (1 - a_t) * (1 - a_t / a') (eta scales the standard deviation). At eta = 0 the two DDIM modes
  are the same deterministic update.

Schedulers hold no model: `step(eps, t, t_prev, x, generator)` turns the model's noise estimate into the next
sample, as diffusers' schedulers do; `torchbook.diffusion.sampling` runs the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from torchbook.errors import UserInputError, unknown

MODES = ("book", "diffusers")
SPACINGS = ("book", "leading", "trailing", "linspace")


@dataclass(frozen=True)
class VarianceSchedule:
    """betas, alphas = 1 - betas and their cumulative products alpha_bar, each of shape (T,), float32."""

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t: int) -> Tensor:
        """alpha_bar at step t; 1 for t < 0 (the clean image)."""
        return self.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The forward process in one jump: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        alpha_bar = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def cosine_schedule(num_steps: int = 4000, s: float = 0.008, max_beta: float = 0.999) -> VarianceSchedule:
    """Equation 18-7 (Nichol & Dhariwal's cosine schedule): alpha_bar(t) = f(t) / f(0) with
    f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2), and beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), capped at
    `max_beta`. Computed in float64 and stored in float32, as diffusers' `squaredcos_cap_v2` is."""
    if num_steps < 1:
        raise UserInputError(f"the schedule needs at least one step, not {num_steps}")

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)],
                         dtype=torch.float32)
    return schedule_from_betas(betas)


def schedule_from_betas(betas: Tensor) -> VarianceSchedule:
    alphas = 1.0 - betas
    return VarianceSchedule(betas, alphas, torch.cumprod(alphas, dim=0))


def linear_schedule(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                    scaled: bool = False) -> VarianceSchedule:
    """DDPM's original linear betas (diffusers' `linear`), or linear in sqrt(beta) (`scaled_linear`)."""
    if scaled:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)
    return schedule_from_betas(betas)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise unknown("sampler mode", mode, MODES)
    return mode


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, device: torch.device,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise drawn as diffusers' `randn_tensor` draws it (the same numbers for the same seed): on
    the generator's device, then moved."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return randn(x.shape, generator, x.device, x.dtype)


VARIANCES = ("fixed_large", "fixed_small")


class DDPM:
    """Ancestral sampling (DDPM) over every one of the T steps: T model calls (4,000 for the book's schedule).

    diffusers mode only: `variance` fixed_large (beta_t, the book's) or fixed_small (the posterior variance
    (1 - alpha_bar_t-1) / (1 - alpha_bar_t) beta_t, DDPMScheduler's default), and `clip_sample` (clamp the predicted
    clean image to [-clip, clip], as DDPMScheduler's clip_sample does; None: off)."""

    def __init__(self, schedule: VarianceSchedule, mode: str = "book", variance: str = "fixed_large",
                 clip_sample: float | None = None):
        self.schedule = schedule
        self.mode = check_mode(mode)
        if variance not in VARIANCES:
            raise unknown("DDPM variance", variance, VARIANCES)
        if mode == "book" and (variance != "fixed_large" or clip_sample is not None):
            raise UserInputError("the book's DDPM uses variance beta_t and no clipping; use mode=diffusers")
        self.variance = variance
        self.clip_sample = clip_sample

    def pairs(self) -> list[tuple[int, int]]:
        """(t, t_prev) for every step, noisiest first; t_prev = -1 is the clean image."""
        return [(t, t - 1) for t in range(self.schedule.num_steps - 1, -1, -1)]

    def step(self, eps: Tensor, t: int, t_prev: int, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        s = self.schedule
        if self.mode == "book":
            alpha, beta, alpha_bar = s.alphas[t], s.betas[t], s.alphas_cumprod[t]
            mean = (x - beta / (1 - alpha_bar) ** 0.5 * eps) / alpha**0.5
            return mean + beta**0.5 * noise_like(x, generator) if t > 0 else mean
        # diffusers' DDPMScheduler.step, epsilon prediction, fixed_large variance, no clipping.
        alpha_prod_t = s.alphas_cumprod[t]
        alpha_prod_t_prev = s.alpha_bar(t_prev)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        x0 = (x - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        x_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        prev = x0_coeff * x0 + x_coeff * x
        if t > 0:
            if self.variance == "fixed_large":
                variance = current_beta_t
            else:
                variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
            prev = prev + (variance**0.5) * noise_like(eps, generator)
        return prev


class DDIM:
    """DDIM (equation 18-9): the same trained model sampled in `steps` jumps, `eta` setting how random each is
    (0: deterministic). `spacing` picks the timesteps: `book` (equal jumps from step T-1 to the clean image, the
    default in book mode) or diffusers' `leading` (its default), `trailing` or `linspace`. `clip_sample` clamps
    each step's predicted clean image to [-clip_sample, clip_sample]: in book mode needed with the book's grid and
    cosine schedule, whose first step divides the model's error by sqrt(alpha_bar_T-1) = 1.2e-5 (see `step`)."""

    def __init__(self, schedule: VarianceSchedule, steps: int = 50, eta: float = 0.85, mode: str = "book",
                 spacing: str | None = None, clip_sample: float | None = None, final_alpha_one: bool = True,
                 steps_offset: int = 0):
        self.schedule = schedule
        # clip_sample: clamp the predicted clean image to [-clip, clip] (in book mode the noise estimate is then
        # recomputed from the clamped image, see `step`). diffusers mode only: set_alpha_to_one (False: the jump after
        # the last step ends at alpha_bar_0 instead of 1) and steps_offset (added to leading timesteps).
        if mode == "book" and (not final_alpha_one or steps_offset):
            raise UserInputError("set_alpha_to_one=False and steps_offset are diffusers options; the book's DDIM has "
                                 "neither: use mode=diffusers")
        self.clip_sample = clip_sample
        self.final_alpha = torch.tensor(1.0) if final_alpha_one else schedule.alphas_cumprod[0]
        self.steps_offset = steps_offset
        self.mode = check_mode(mode)
        self.steps = steps
        self.eta = eta
        self.spacing = spacing or ("book" if mode == "book" else "leading")
        if self.spacing not in SPACINGS:
            raise unknown("timestep spacing", self.spacing, SPACINGS)
        if not 1 <= steps <= schedule.num_steps:
            raise UserInputError(f"steps={steps} must be between 1 and the schedule's {schedule.num_steps} steps")
        if eta < 0:
            raise UserInputError(f"eta={eta} must be 0 (deterministic) or positive")

    def pairs(self) -> list[tuple[int, int]]:
        """(t, t_prev) for every jump, noisiest first; t_prev = -1 is the clean image."""
        T, n = self.schedule.num_steps, self.steps
        if self.spacing == "book":
            grid = np.linspace(T - 1, -1, n + 1).round().astype(np.int64).tolist()
            return list(zip(grid[:-1], grid[1:]))
        # diffusers' DDIMScheduler.set_timesteps; its step() always jumps back by T // n.
        if self.spacing == "leading":
            times = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + self.steps_offset
        elif self.spacing == "trailing":
            times = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        else:
            times = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        return [(int(t), int(t) - T // n) for t in times]

    def alpha_bar_prev(self, t_prev: int) -> Tensor:
        """alpha_bar at the step jumped to: after the last step, 1 (or alpha_bar_0 without set_alpha_to_one)."""
        return self.schedule.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha

    def variance(self, t: int, t_prev: int) -> Tensor:
        s = self.schedule
        alpha_prod_t, alpha_prod_t_prev = s.alphas_cumprod[t], self.alpha_bar_prev(t_prev)
        if self.mode == "book":
            return self.eta * (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * s.betas[t]
        std = self.eta * ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)) ** 0.5
        return std**2

    def step(self, eps: Tensor, t: int, t_prev: int, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        alpha_prod_t = self.schedule.alphas_cumprod[t]
        alpha_prod_t_prev = self.alpha_bar_prev(t_prev)
        beta_prod_t = 1 - alpha_prod_t
        x0 = (x - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)
        if self.mode == "book":
            if self.clip_sample is not None:
                # The book's grid starts at t = T - 1, where the cosine schedule's alpha_bar is 1.5e-10: x0 above is
                # the model's error times 1 / sqrt(alpha_bar) = 81,000, and unclamped it swamps the whole sample.
                # Clamp it to the data's range and keep the update consistent: the noise that x and this x0 imply.
                x0 = x0.clamp(-self.clip_sample, self.clip_sample)
                eps = (x - alpha_prod_t**0.5 * x0) / beta_prod_t**0.5
            var = self.variance(t, t_prev)
            prev = alpha_prod_t_prev**0.5 * x0 + (1 - alpha_prod_t_prev - var) ** 0.5 * eps
            return prev + var**0.5 * noise_like(x, generator) if self.eta > 0 else prev
        # diffusers' DDIMScheduler.step, epsilon prediction.
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = self.eta * variance ** (0.5)
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps
        prev = alpha_prod_t_prev ** (0.5) * x0 + direction
        if self.eta > 0:
            prev = prev + std_dev_t * noise_like(eps, generator)
        return prev


Scheduler = DDPM | DDIM
