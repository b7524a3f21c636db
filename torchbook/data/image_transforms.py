"""Image transforms in torch (no torchvision): batched random crops and flips, mixup and CutMix, and image files.

Every random transform takes a batch (B, C, H, W) already on the training device and draws from torch's global
generator, which the trainer seeds and saves in its checkpoints, so a resumed run draws the same augmentations.
Augmentation and regularization follow *Deep Learning with PyTorch* and the papers: random crops with padding and
horizontal flips (Krizhevsky et al. 2012), mixup (Zhang et al. 2017), CutMix (Yun et al. 2019).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from torchbook.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # what `read_image` reads


def as_batch(x: Tensor) -> Tensor:
    """(B, H, W) one-channel images -> (B, 1, H, W); (B, C, H, W) unchanged."""
    return x.unsqueeze(1) if x.dim() == 3 else x


def random_crop(x: Tensor, padding: int) -> Tensor:
    """Zero-pad each side by `padding` pixels, then cut a random crop of the original size from each image."""
    if padding <= 0:
        return x
    x = as_batch(x)
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (batch, 1, 1), device=x.device)
    left = torch.randint(0, 2 * padding + 1, (batch, 1, 1), device=x.device)
    rows = (top + torch.arange(height, device=x.device).view(1, -1, 1)).expand(batch, height, width)
    cols = (left + torch.arange(width, device=x.device).view(1, 1, -1)).expand(batch, height, width)
    flat = rows * (width + 2 * padding) + cols  # (B, H, W) positions in each padded image
    out = padded.flatten(2).gather(2, flat.flatten(1)[:, None].expand(-1, x.size(1), -1))
    return out.view_as(x)


def random_flip(x: Tensor, p: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability p."""
    x = as_batch(x)
    flip = torch.rand(x.size(0), device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def mixup(x: Tensor, target: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Blend each image and its soft target with another of the batch: lam ~ Beta(alpha, alpha)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.size(0), device=x.device)
    return lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]


def cutmix(x: Tensor, target: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Paste a random box of another image of the batch into each image; targets mix by the box's area."""
    x = as_batch(x)
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    height, width = x.shape[-2:]
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(0, height, ())), int(torch.randint(0, width, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    perm = torch.randperm(x.size(0), device=x.device)
    x = x.clone()
    x[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
    kept = 1 - (bottom - top) * (right - left) / (height * width)
    return x, kept * target + (1 - kept) * target[perm]


def read_image(path: str | Path, size: tuple[int, int], channels: int, invert: bool = False) -> Tensor:
    """A PNG/JPEG file as a (channels, H, W) float tensor in [0, 1], resized to `size` (H, W). `invert` for a dark
    object on a light background fed to a model trained on light-on-dark images (Fashion-MNIST)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as file:
            image = file.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise UserInputError(f"image {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserInputError(f"{str(path)!r} is not an image Pillow can read (PNG, JPEG, ...): {e}") from None
    tensor = torch.from_numpy(array)
    tensor = tensor[None] if channels == 1 else tensor.permute(2, 0, 1)
    return 1.0 - tensor if invert else tensor
