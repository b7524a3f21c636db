"""The sampling loop (book chapter 18): start from pure noise and let a scheduler undo it, one model call a step.

`sample(model, scheduler, n, shape, ...)` works with any noise predictor called as `model(x, t, class_labels)`
(`torchbook.models.unet.UNet`) and any scheduler of `torchbook.diffusion.schedulers` (DDPM or DDIM, book or
diffusers mode). Classifier-free guidance (Ho & Salimans, 2022): with `guidance` g and a class, the noise estimate
is eps(x, t, none) + g * (eps(x, t, class) - eps(x, t, none)); g = 1 is the plain conditional model, g = 0 the
unconditional one, g > 1 trades diversity for fidelity to the class. The "no class" label is the model's last
class index (`num_class_embeds - 1`), which it saw in training in place of the true class now and then.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from tqdm import tqdm

from torchbook.diffusion.schedulers import DDIM, DDPM, randn
from torchbook.errors import UserInputError


def null_class(model: nn.Module) -> int | None:
    """The model's "no class" index, or None for an unconditional model."""
    count = getattr(getattr(model, "config", None), "num_class_embeds", None)
    return int(count) - 1 if count else None


def guided_noise(model: nn.Module, x: Tensor, t: int, labels: Tensor | None, guidance: float) -> Tensor:
    """The model's noise estimate at step t, with classifier-free guidance when `labels` is given."""
    none = null_class(model)
    timestep = torch.full((len(x),), t, dtype=torch.long, device=x.device)
    if none is None:
        return model(x, timestep)
    unconditional = torch.full((len(x),), none, dtype=torch.long, device=x.device)
    if labels is None:
        return model(x, timestep, unconditional)
    if guidance == 1.0:
        return model(x, timestep, labels)
    if guidance == 0.0:
        return model(x, timestep, unconditional)
    both = model(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([labels, unconditional]))
    conditional, free = both.chunk(2)
    return free + guidance * (conditional - free)


@torch.no_grad()
def sample(
    model: nn.Module,
    scheduler: DDPM | DDIM,
    n: int,
    shape: tuple[int, ...],
    class_labels: Tensor | None = None,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """`n` samples of `shape` (C, H, W) in the model's scale ([-1, 1] for our recipes), on `device`.

    `class_labels` (n,) asks for those classes (class-conditional models only). The initial noise and every step's
    noise come from `generator`, so a seeded generator gives the same images every time."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if class_labels is not None:
        if null_class(model) is None:
            raise UserInputError("this model was trained without classes: sample it without a class")
        class_labels = class_labels.to(device)
    if guidance < 0:
        raise UserInputError(f"guidance={guidance} must be 0 (unconditional), 1 (conditional) or more")
    was_training = model.training
    model.eval()
    x = randn((n, *shape), generator, device)
    pairs = scheduler.pairs()

    for t, t_prev in tqdm(pairs, desc="sampling", disable=not progress, leave=False, file=sys.stderr):
        eps = guided_noise(model, x, t, class_labels, guidance)
        x = scheduler.step(eps, t, t_prev, x, generator)
    model.train(was_training)
    return x


def to_images(x: Tensor) -> Tensor:
    """Samples in [-1, 1] -> pixel intensities in [0, 1], (n, C, H, W) -> (n, H, W) for one channel."""
    images = ((x.float() + 1) / 2).clamp(0, 1).cpu()
    return images[:, 0] if images.shape[1] == 1 else images
