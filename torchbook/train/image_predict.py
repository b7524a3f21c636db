"""Predictions of a finished image run (cnn, vit, image-classifier, transfer-learning) for image files: the top
classes with their probabilities (temperature-scaled when the run fitted a temperature), and on request a
saliency overlay per image. `torchbook predict RUN_DIR IMAGE...` is the command-line face of `predict_images`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import torchbook
from torchbook.data.image_transforms import read_image
from torchbook.errors import UserInputError
from torchbook.train.interpret import saliency


@dataclass
class ImagePrediction:
    path: Path
    top: list[tuple[str, float]]  # (class, probability), most likely first
    saliency_path: Path | None = None


def is_image_run(meta: dict[str, Any]) -> bool:
    return "image_shape" in meta and "classes" in meta


def predict_images(run_dir: str | Path, paths: list[str | Path], top: int = 3, invert: bool = False,
                   saliency_dir: str | Path | None = None) -> list[ImagePrediction]:
    """Read each image (grayscale or RGB to the model's channels, resized to its input size; `invert` for dark
    objects on a light background), classify it, and keep the `top` classes. With `saliency_dir`, write
    `<name>.saliency.png`: the image beside its saliency map for the predicted class."""
    if top < 1:
        raise UserInputError(f"top={top}: list at least 1 class per image")
    loaded = torchbook.load(run_dir)
    saved = loaded.meta["extra"]  # what the recipe saved beside its model
    if not is_image_run(saved):
        raise UserInputError(f"{str(run_dir)!r} is not an image run (its model records no classes and image shape); "
                             "image runs: cnn, vit, image-classifier, transfer-learning")
    model, classes = loaded.model, list(saved["classes"])
    channels, height, width = [1, *saved["image_shape"]] if len(saved["image_shape"]) == 2 else saved["image_shape"]
    temperature = float(saved.get("temperature", 1.0))
    images = torch.stack([read_image(p, (height, width), channels, invert) for p in paths])
    with torch.no_grad():
        probs = (model(images) / temperature).softmax(-1)
    k = min(top, len(classes))
    values, indices = probs.topk(k, dim=-1)
    predictions = [ImagePrediction(Path(p), [(classes[int(i)], float(v)) for v, i in zip(vs, ix)])
                   for p, vs, ix in zip(paths, values, indices)]
    if saliency_dir is not None:
        folder = Path(saliency_dir)
        folder.mkdir(parents=True, exist_ok=True)
        maps = saliency(model, images, indices[:, 0]).numpy()
        for prediction, image, heat in zip(predictions, images, maps):
            prediction.saliency_path = folder / f"{prediction.path.stem}.saliency.png"
            _overlay(prediction.saliency_path, image, heat, prediction.top[0])
    return predictions


def _overlay(path: Path, image: torch.Tensor, heat: np.ndarray, best: tuple[str, float]) -> None:
    from torchbook.plots import plt, save_figure

    shown = image[0].numpy() if image.size(0) == 1 else image.permute(1, 2, 0).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(4.4, 2.4))
    axes[0].imshow(shown, cmap="gray" if image.size(0) == 1 else None)
    axes[0].set_title(f"{best[0]} ({best[1]:.0%})", fontsize=8)
    axes[1].imshow(shown, cmap="gray" if image.size(0) == 1 else None)
    axes[1].imshow(heat, cmap="inferno", alpha=0.6)
    axes[1].set_title("saliency", fontsize=8)
    for ax in axes:
        ax.axis("off")
    save_figure(fig, path)
