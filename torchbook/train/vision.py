"""Image classification training (chapters 11, 12 and 16): the step the vision recipes give the trainer, with
augmentation and regularization as options, and the shared image data sets and splits.

`AugmentOptions` is a config mixin (`class Config(AugmentOptions, TrainConfig)`), so every option is a flat key:
`crop_padding=4 flip=true mixup=0.2 cutmix=1.0 label_smoothing=0.1`. Stochastic depth (`drop_path`) belongs to
the models. Augmentation runs on the device, on whole batches, only while training (evaluation sees the images
unchanged); mixup and CutMix train on soft targets, so the loss is cross-entropy against a distribution.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import TensorDataset

import torchbook
from torchbook.data.image_transforms import cutmix, mixup, random_crop, random_flip
from torchbook.data.images import IMAGE_DATASETS, ImageData
from torchbook.data.splits import split_indices
from torchbook.devices import device_of
from torchbook.errors import UserInputError, unknown
from torchbook.runs import RunDir
from torchbook.train.trainer import Step, StepFn, Trainer


@dataclass
class ImageDataOptions:
    """Config mixin of the vision recipes: which images, and how many of each split (0 = all)."""

    data: Literal["fashion-mnist", "digits"] = "fashion-mnist"
    limit: int = 0  # training images, for smoke and quick runs
    val_limit: int = 0
    test_limit: int = 0


@dataclass
class AugmentOptions:
    crop_padding: int = 0  # random crops after zero-padding each side by this many pixels (0 = off)
    flip: bool = False  # random left-right mirror (off for digits, whose mirror images are other symbols)
    mixup: float = 0.0  # mixup's Beta(alpha, alpha) (0 = off)
    cutmix: float = 0.0  # CutMix's Beta(alpha, alpha) (0 = off); with mixup too, each batch picks one at random
    label_smoothing: float = 0.0  # the target puts this much mass uniformly on every class

    def validate_augmentation(self) -> None:
        for name in ("crop_padding", "mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise UserInputError(f"{name}={getattr(self, name)} must be 0 (off) or positive")
        if not 0 <= self.label_smoothing < 1:
            raise UserInputError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")

    def augmentation_summary(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in ("crop_padding", "flip", "mixup", "cutmix", "label_smoothing")
                 if getattr(self, name)]
        return ", ".join(parts) or "none"


def classification_step(options: AugmentOptions, n_classes: int) -> StepFn:
    """`step(model, (images, labels))`: while training (gradients on), augment and take the cross-entropy against
    (smoothed, mixed) soft targets; in evaluation, the plain cross-entropy with logits and labels for the metrics."""

    def step(model: nn.Module, batch: Any) -> Step:
        images, labels = batch
        if not torch.is_grad_enabled():  # the trainer evaluates under no_grad
            logits = model(images)
            return Step(F.cross_entropy(logits, labels), logits, labels, len(labels))
        x = images
        if options.crop_padding:
            x = random_crop(x, options.crop_padding)
        if options.flip:
            x = random_flip(x)
        target = F.one_hot(labels, n_classes).to(x.dtype)
        if options.label_smoothing:
            target = target * (1 - options.label_smoothing) + options.label_smoothing / n_classes
        use_mixup, use_cutmix = options.mixup > 0, options.cutmix > 0
        if use_mixup and use_cutmix:
            use_mixup = bool(torch.rand(()) < 0.5)
            use_cutmix = not use_mixup
        if use_mixup:
            x, target = mixup(x, target, options.mixup)
        elif use_cutmix:
            x, target = cutmix(x, target, options.cutmix)
        logits = model(x)
        loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return Step(loss, count=len(labels))

    return step


def accuracy_metric(n_classes: int) -> dict[str, Any]:
    return {"accuracy": lambda: torchmetrics.classification.MulticlassAccuracy(num_classes=n_classes, average="micro")}


@dataclass
class ImageSplits:
    """Train/validation/test tensors of an image data set, and the indices that made them (for split.json)."""

    data: ImageData
    indices: dict[str, np.ndarray]
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset

    @property
    def n_classes(self) -> int:
        return len(self.data.classes)

    @property
    def image_shape(self) -> list[int]:
        return [1, *self.data.images.shape[1:]]


@functools.lru_cache(maxsize=2)
def _pooled_images(name: str) -> tuple[ImageData, np.ndarray, np.ndarray, int]:
    """A data set's training and test images in one array (read and checksummed once per process; the arrays
    are never modified), and how many come first from the training file."""
    data = IMAGE_DATASETS[name]()
    if data.test_images is None or data.test_labels is None:
        return data, data.images, data.labels, len(data.images)
    return (data, np.concatenate([data.images, data.test_images]), np.concatenate([data.labels, data.test_labels]),
            len(data.images))


def image_splits(name: str, seed: int, limit: int = 0, val_limit: int = 0, test_limit: int = 0,
                 classes: list[int] | None = None) -> ImageSplits:
    """Fashion-MNIST: the book's split (the last 5,000 training images validate, the official 10,000 test);
    digits: stratified 65/15/20. Images come as (N, 1, H, W). `limit`s keep the first images of a split (smoke
    runs); `classes` keeps only those labels (relabelled 0..k-1 in the given order: transfer learning)."""
    data, images, labels, n_train = _pooled_images(name)
    if n_train < len(images):  # an official test split (Fashion-MNIST): the book's split
        indices = {"train": np.arange(n_train - 5000), "val": np.arange(n_train - 5000, n_train),
                   "test": np.arange(n_train, len(images))}
    else:
        indices = split_indices(len(images), val=0.15, test=0.20, seed=seed, stratify=labels)
    if classes is not None:
        labels = labels.copy()
        keep = np.isin(labels, classes)
        mapping = np.full(int(labels.max()) + 1, -1)
        mapping[classes] = np.arange(len(classes))
        labels = mapping[labels]
        indices = {k: v[keep[v]] for k, v in indices.items()}
        data = ImageData(data.name, data.source, data.images, data.labels, [data.classes[c] for c in classes],
                         data.test_images, data.test_labels)
    for split, cap in (("train", limit), ("val", val_limit), ("test", test_limit)):
        if cap:
            indices[split] = indices[split][:cap]

    def tensors(index: np.ndarray) -> TensorDataset:
        x = torch.from_numpy(np.ascontiguousarray(images[index]))[:, None]
        return TensorDataset(x, torch.from_numpy(labels[index].astype(np.int64)))

    return ImageSplits(data, indices, tensors(indices["train"]), tensors(indices["val"]), tensors(indices["test"]))


def channel_stats(dataset: TensorDataset) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of a training set's images (the model's input normalization)."""
    x = dataset.tensors[0]
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-6).tolist()


def train_same_time(model: nn.Module, config: Any, splits: ImageSplits, seconds: float,
                    options: AugmentOptions | None = None) -> dict[str, float]:
    """Train `model` on the same splits for `seconds` of training time (no run folder, no checkpoints), with
    `config`'s optimizer and seed; the best validation epoch's weights; its test accuracy. A baseline for "the
    same data in the same time" comparisons."""
    same_time = dataclasses.replace(config, epochs=10_000, time_budget_s=seconds, restore_best=True, patience=0,
                                    checkpoint_every=0, progress=False)
    trainer = Trainer(model, same_time, None, splits.train, splits.val,
                      step=classification_step(options or AugmentOptions(), splits.n_classes),
                      metrics=accuracy_metric(splits.n_classes))
    trainer.fit()
    return {"test_accuracy": trainer.evaluate(splits.test)["accuracy"], "epochs": trainer.epoch,
            "train_seconds": trainer.train_time}


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` (eval mode) on an (images, labels) dataset."""
    x, y = dataset.tensors
    device = device_of(model)
    predictions = torch.cat([model(chunk.to(device)).argmax(1).cpu() for chunk in x.split(batch_size)])
    return float((predictions == y).float().mean())


ABLATIONS: dict[str, dict[str, Any]] = {  # name -> config overrides; "none" is the reference
    "none": {},
    "random crops (pad 2)": {"crop_padding": 2},
    "flips": {"flip": True},
    "mixup (0.2)": {"mixup": 0.2},
    "CutMix (1.0)": {"cutmix": 1.0},
    "label smoothing (0.1)": {"label_smoothing": 0.1},
    "stochastic depth (0.1)": {"drop_path": 0.1},
    "crops + flips + label smoothing": {"crop_padding": 2, "flip": True, "label_smoothing": 0.1},
}


def ablation(config: Any, build: Callable[[Any], nn.Module], splits: ImageSplits,
             names: list[str]) -> list[dict[str, Any]]:
    """Train one model per named variant of `ABLATIONS` (`config` with its overrides, every augmentation option
    reset first), the same epochs and seed, no run folder; each variant's validation and test accuracy."""
    off = {"crop_padding": 0, "flip": False, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0}
    if hasattr(config, "drop_path"):
        off["drop_path"] = 0.0
    rows = []
    for name in names:
        if name not in ABLATIONS:
            raise unknown("ablation", name, ABLATIONS)
        overrides = {k: v for k, v in ABLATIONS[name].items() if hasattr(config, k)}
        variant = dataclasses.replace(config, **{**off, **overrides}, checkpoint_every=0, progress=False)
        torch.manual_seed(config.seed)
        model = build(variant)
        trainer = Trainer(model, variant, None, splits.train, splits.val,
                          step=classification_step(variant, splits.n_classes), metrics=accuracy_metric(splits.n_classes))
        trainer.fit()
        rows.append({"variant": name, "val_accuracy": trainer.evaluate(splits.val)["accuracy"],
                     "test_accuracy": trainer.evaluate(splits.test)["accuracy"], "train_seconds": trainer.train_time})
    return rows


def evaluate_image_run(run_dir: Any, config_class: type, device: str = "auto") -> dict[str, Any]:
    """Reload a finished image run's model (`torchbook.load`) and measure it again on the run's test split (the
    config's `data`, `seed` and limits)."""
    run = RunDir.open(run_dir)
    config: Any = run.load_config(config_class)
    model = torchbook.load(run.path, map_location=device).model
    splits = image_splits(config.data, config.seed, config.limit, config.val_limit, config.test_limit)
    return {"test_accuracy": accuracy(model, splits.test), "test_images": len(splits.test)}
