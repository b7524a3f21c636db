"""Sample quality, measured: a Fréchet distance on the penultimate features of a Fashion-MNIST classifier.

The Fréchet Inception Distance compares the mean and covariance of Inception-v3 features of real and generated
images: ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)). Inception's weights cannot be downloaded here, so
ours uses the features (the last hidden layer, 128 units) of an MLP classifier trained on the same dataset's
training images with the one trainer: the same formula (torchmetrics' `FrechetInceptionDistance` with a custom
feature extractor), a different feature space, so the values are comparable between our models, not with
published FIDs. The classifier is trained once per (dataset, images, seed) and cached in `$TORCHBOOK_CACHE`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from torchbook import paths
from torchbook.errors import CheckpointError
from torchbook.hub import load_model, save_model
from torchbook.models.mlp import MLP, MLPConfig
from torchbook.train.config import TrainConfig
from torchbook.train.trainer import Trainer

log = logging.getLogger(__name__)
FEATURE_HIDDEN = [256, 128]
CLASSIFIER_SETTINGS = {"epochs": 5, "batch_size": 128, "lr": 1e-3, "optimizer": "adam"}


class PenultimateFeatures(nn.Module):
    """The classifier without its output layer: images (N, H, W) in [0, 1] -> features (N, 128)."""

    def __init__(self, classifier: MLP):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.config.hidden[-1]

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.layers[:-1](self.classifier.standardize(images.float().flatten(1)))


def feature_classifier(images: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0,
                       dataset: str = "") -> MLP:
    """An MLP classifier (784-256-128-classes) trained on `images` and `labels`, from the cache when the same
    images, labels and seed trained one before."""
    digest = hashlib.sha256()
    for part in (np.ascontiguousarray(images).tobytes(), np.ascontiguousarray(labels).tobytes(),
                 json.dumps([seed, FEATURE_HIDDEN, CLASSIFIER_SETTINGS]).encode()):
        digest.update(part)
    folder = paths.cache() / "frechet" / f"{dataset or 'images'}-{digest.hexdigest()[:16]}"
    if (folder / "model.safetensors").exists():
        try:
            model = load_model(folder)
            if isinstance(model, MLP):
                return model
        except CheckpointError as e:
            log.warning("retraining the Fréchet feature classifier: %s", e)
    torch.manual_seed(seed)
    pixels = int(np.prod(images.shape[1:]))
    model = MLP(MLPConfig(pixels, n_classes, list(FEATURE_HIDDEN), "relu", standardize=False))
    config = dataclasses.replace(TrainConfig(), seed=seed, progress=False, **CLASSIFIER_SETTINGS)  # type: ignore[arg-type]
    data = TensorDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
    Trainer(model, config, None, data, criterion=nn.CrossEntropyLoss()).fit()
    save_model(model.cpu().eval(), folder)
    log.info("trained the Fréchet feature classifier, cached in %s", folder)
    return model.eval()


def feature_extractor(images: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0,
                      dataset: str = "") -> PenultimateFeatures:
    """The penultimate-feature extractor of the (cached) classifier trained on `images` and `labels`."""
    return PenultimateFeatures(feature_classifier(images, labels, n_classes, seed, dataset))


@torch.no_grad()
def frechet_distance(features: PenultimateFeatures, real: Tensor | np.ndarray, generated: Tensor | np.ndarray,
                     batch_size: int = 1000) -> float:
    """The Fréchet distance between the feature distributions of `real` and `generated` images (N, H, W) in [0, 1]."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features, reset_real_features=True)
    for images, is_real in ((real, True), (generated, False)):
        tensor = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images).float()
        for chunk in tensor.split(batch_size):
            metric.update(chunk, real=is_real)
    return float(metric.compute())


@torch.no_grad()
def classifier_accuracy(classifier: MLP, images: np.ndarray, labels: np.ndarray) -> float:
    logits = classifier(torch.from_numpy(np.ascontiguousarray(images)))
    return float((logits.argmax(1).numpy() == labels).mean())
