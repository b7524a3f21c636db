"""`vit`: a vision transformer (chapter 16) trained from scratch on Fashion-MNIST, beside the book's CNN trained on
the same images for the same wall-clock time, with attention maps.

The model (`torchbook.models.vit.ViT`) is built on torchbook's own transformer encoder layers: 4x4-pixel patches
of the 28x28 images (49 patches), a class token, learned positions. The book's ViT-B/16 (patch 16, width 768, 12
layers, 12 heads) is for 224x224 ImageNet-style images: the book prints no Fashion-MNIST figure for a ViT, so the
report compares with the CNN of the same run; the `book` preset is our larger setting (about 2.5 hours on 2 CPU
cores here, resumable). Loading Hugging Face ViT/DeiT checkpoints: `torchbook.hub.vision`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from torchbook.data.splits import split_record
from torchbook.errors import UserInputError
from torchbook.hub import save_model
from torchbook.models.cnn import FashionCNN, FashionCNNConfig
from torchbook.models.vit import ViT, ViTConfig, attention_rollout
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train import TrainConfig, Trainer
from torchbook.train.vision import (
    AugmentOptions,
    ImageDataOptions,
    accuracy_metric,
    channel_stats,
    classification_step,
    evaluate_image_run,
    image_splits,
    train_same_time,
)

NAME = "vit"


@dataclass
class Config(ImageDataOptions, AugmentOptions, TrainConfig):
    patch_size: int = 4
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.1
    drop_path: float = 0.1  # stochastic depth of the last layer
    compare_cnn: bool = True  # also train the book's CNN (quarter width) on the same images for the same time
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    schedule: str = "cosine"
    warmup_steps: int = 500
    grad_clip: float = 1.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"limit": 512, "val_limit": 256, "test_limit": 512, "epochs": 1, "d_model": 32, "n_layers": 2,
                  "d_ff": 64, "warmup_steps": 2},
        "quick": {"limit": 10000, "val_limit": 1000, "epochs": 5, "d_model": 48, "n_layers": 3, "n_heads": 3,
                  "d_ff": 96, "patch_size": 7, "warmup_steps": 50, "batch_size": 64, "lr": 2e-3, "drop_path": 0.0},
        "book": {},
    }

    def validate(self) -> None:
        super().validate()
        self.validate_augmentation()
        if self.d_model % self.n_heads:
            raise UserInputError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")


def attention_plot(path: Any, images: np.ndarray, rollout: np.ndarray, grid: int, titles: list[str]) -> None:
    """Each image beside the class token's attention rollout over its patches, upsampled to the image."""
    from torchbook.plots import plt, save_figure

    fig, axes = plt.subplots(2, len(images), figsize=(1.6 * len(images), 3.4), squeeze=False)
    for i, (image, weights) in enumerate(zip(images, rollout)):
        axes[0, i].imshow(image, cmap="gray")
        axes[0, i].set_title(titles[i], fontsize=7)
        heat = np.kron(weights.reshape(grid, grid), np.ones((image.shape[0] // grid, image.shape[1] // grid)))
        axes[1, i].imshow(image, cmap="gray")
        axes[1, i].imshow(heat, cmap="inferno", alpha=0.6)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle("Attention rollout of the class token (bottom)")
    save_figure(fig, path)


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    started = time.time()
    splits = image_splits(config.data, config.seed, config.limit, config.val_limit, config.test_limit)
    run.write_json("split.json", split_record(splits.indices, splits.data.source, config.seed, dataset=splits.data.name))
    channels, size = splits.image_shape[0], splits.image_shape[1]
    if size % config.patch_size:
        raise UserInputError(f"patch_size={config.patch_size} must divide the image size {size}")
    mean, std = channel_stats(splits.train)
    torch.manual_seed(config.seed)
    model = ViT(ViTConfig(size, config.patch_size, channels, splits.n_classes, config.d_model, config.n_layers,
                          config.n_heads, config.d_ff, config.dropout, config.drop_path, eps=1e-6,
                          pixel_mean=mean, pixel_std=std))
    trainer = Trainer(model, config, run, splits.train, splits.val,
                      step=classification_step(config, splits.n_classes), metrics=accuracy_metric(splits.n_classes))
    trainer.fit()
    val, test = trainer.evaluate(splits.val), trainer.evaluate(splits.test)
    save_model(model, run.model_dir, extra={"classes": splits.data.classes, "image_shape": splits.image_shape})
    results: dict[str, Any] = {
        "val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "train_seconds": trainer.train_time, "epochs": trainer.epoch,
        "parameters": sum(p.numel() for p in model.parameters()), "dataset": splits.data.name,
    }
    if config.compare_cnn:
        torch.manual_seed(config.seed)
        cnn = FashionCNN(FashionCNNConfig(channels, splits.n_classes, size, [16, 32, 64], [64, 32], 0.1, mean, std))
        cnn_config = TrainConfig(**{k: getattr(config, k) for k in TrainConfig.__dataclass_fields__})
        cnn_config.optimizer, cnn_config.lr, cnn_config.schedule, cnn_config.weight_decay = "nadam", 1e-3, "constant", 0.0
        baseline = train_same_time(cnn, cnn_config, splits, trainer.train_time)
        results.update({f"cnn_{k}": v for k, v in baseline.items()})
    run.write_json("results.json", results)
    run.log(kind="eval", **results)

    x, y = splits.test.tensors
    shown = x[:8]
    with torch.no_grad():
        rollout = attention_rollout(model.eval().attention_maps(shown), model.config.n_tokens)
        predicted = model(shown).argmax(1)
    names = splits.data.classes
    attention_plot(run.plots / "attention_rollout.png", shown[:, 0].numpy(), rollout.numpy(), model.config.grid,
                   [f"{names[int(p)]}\n(true {names[int(t)]})" for p, t in zip(predicted, y[:8])])

    report = Report(f"Vision transformer on {splits.data.name}", NAME, "16", splits.data.source)
    report.compare("test accuracy", test["accuracy"], None,
                   f"the book prints no Fashion-MNIST ViT figure; {len(splits.test):,} test images")
    report.compare("validation accuracy", val["accuracy"], None, f"{len(splits.val):,} images")
    if config.compare_cnn:
        report.compare("book's CNN (quarter width), same images and time, test accuracy",
                       results["cnn_test_accuracy"], None,
                       f"{results['cnn_epochs']} epochs in {results['cnn_train_seconds']:.0f} s")
        beats = test["accuracy"] > results["cnn_test_accuracy"]
        why = "" if beats else (": without convolution's locality built in, a transformer needs more data or time "
                                "to learn it")
        report.text("Verdict", f"In the same {trainer.train_time:.0f} s on the same {len(splits.train):,} images, "
                               f"the ViT {'beats' if beats else 'does not beat'} the CNN ({test['accuracy']:.4f} vs "
                               f"{results['cnn_test_accuracy']:.4f}){why}.")
    report.table("Run", ["setting", "value"], [
        ["patches", f"{model.config.grid}x{model.config.grid} of {config.patch_size}x{config.patch_size} pixels"],
        ["width / layers / heads", f"{config.d_model} / {config.n_layers} / {config.n_heads}"],
        ["parameters", results["parameters"]], ["epochs", trainer.epoch],
        ["training time (s)", round(trainer.train_time, 1)], ["augmentation", config.augmentation_summary()]])
    if (run.plots / "learning_curves.png").exists():
        report.image("Learning curves", run.plots / "learning_curves.png", run.path)
    report.image("Attention maps", run.plots / "attention_rollout.png", run.path)
    report.write(run.path, time.time() - started)
    return run


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, Any]:
    """Reload the saved model and measure it again on the run's test split."""
    return evaluate_image_run(run_dir, Config, device)


RECIPE = Recipe(NAME, "16", "vision transformer from scratch on Fashion-MNIST, beside the CNN in the same time; "
                "attention maps", Config, run, evaluate)
