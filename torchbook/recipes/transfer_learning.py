"""`transfer-learning`: chapter 11's experiment on Fashion-MNIST, repeated over several seeds.

Model A is an MLP trained on the 8 classes other than T-shirt/top and Pullover. Task B is telling those two apart
from only 20 labelled images. B from scratch (the same architecture, fresh weights) is compared with B reusing
A's hidden layers: a new output layer is trained with the reused layers frozen for `freeze_epochs`, then
everything is fine-tuned at a lower learning rate. Both are scored on the 2,000 test images of the two classes.

The book prints 92.5% (reusing A) against 71.6% (from scratch) and then admits the pair was picked among many
tries ("the improvement generally drops, or even vanishes or reverses"): the report gives the mean and standard
deviation over `seeds` draws of the 20 images and of the new weights, beside the book's pair, with no gate.
The MLP's sizes and the training settings are ours (the book's figures do not depend on them being equal).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import torchbook
from torchbook.data.splits import split_record
from torchbook.errors import UserInputError
from torchbook.hub import save_model
from torchbook.models.mlp import MLP, MLPConfig
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train import TrainConfig, Trainer
from torchbook.train.vision import AugmentOptions, accuracy, accuracy_metric, classification_step, image_splits

NAME = "transfer-learning"
B_CLASSES = [0, 2]  # T-shirt/top, Pullover
A_CLASSES = [c for c in range(10) if c not in B_CLASSES]
BOOK_REUSE, BOOK_SCRATCH = 0.925, 0.716


@dataclass
class Config(TrainConfig):
    hidden: list[int] = field(default_factory=lambda: [100, 100, 100])
    activation: str = "relu"
    epochs: int = 20  # model A
    limit: int = 0  # model A's training images (0 = all of the 8 classes)
    b_images: int = 20  # labelled images of task B
    b_batch_size: int = 4
    freeze_epochs: int = 4  # B on A: epochs training only the new output layer
    b_epochs: int = 16  # then epochs fine-tuning everything (B from scratch trains freeze_epochs + b_epochs)
    finetune_lr: float = 3e-4
    seeds: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"epochs": 1, "limit": 2000, "seeds": 2, "b_epochs": 4, "freeze_epochs": 2},
        "quick": {"epochs": 5, "limit": 20000},
        "book": {},
    }

    def validate(self) -> None:
        super().validate()
        if self.b_images < 2 or self.seeds < 1:
            raise UserInputError("b_images must be at least 2 and seeds at least 1")


def train(model: nn.Module, config: Config, data: TensorDataset, epochs: int, lr: float, batch_size: int,
          seed: int) -> None:
    """Plain training through the trainer (no run folder, no validation: task B has 20 labelled images)."""
    settings = dataclasses.replace(config, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, patience=0,
                                   checkpoint_every=0, progress=False, schedule="constant", warmup_steps=0)
    Trainer(model, settings, None, data, step=classification_step(AugmentOptions(), 2)).fit()


def task_b(config: Config, model_a: MLP, b_train: TensorDataset, b_test: TensorDataset, seed: int) -> dict[str, float]:
    """One draw: `b_images` labelled images (both classes present), B from scratch and B on A."""
    rng = np.random.default_rng(seed)
    labels = b_train.tensors[1].numpy()
    while True:
        chosen = rng.choice(len(labels), config.b_images, replace=False)
        if len(set(labels[chosen])) == 2:
            break
    few = TensorDataset(*(t[torch.from_numpy(chosen)] for t in b_train.tensors))
    total_epochs = config.freeze_epochs + config.b_epochs

    torch.manual_seed(seed)
    scratch = MLP(dataclasses.replace(model_a.config, out_features=2))
    train(scratch, config, few, total_epochs, config.lr, config.b_batch_size, seed)

    torch.manual_seed(seed)
    reuse = copy.deepcopy(model_a)
    reuse.config = dataclasses.replace(model_a.config, out_features=2)
    reuse.layers[-1] = nn.Linear(model_a.config.hidden[-1], 2)
    for p in reuse.layers[:-1].parameters():
        p.requires_grad_(False)
    train(reuse, config, few, config.freeze_epochs, config.lr, config.b_batch_size, seed)
    for p in reuse.parameters():
        p.requires_grad_(True)
    train(reuse, config, few, config.b_epochs, config.finetune_lr, config.b_batch_size, seed + 1)
    return {"seed": seed, "scratch": accuracy(scratch.eval(), b_test), "reuse": accuracy(reuse.eval(), b_test)}


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    started = time.time()
    a = image_splits("fashion-mnist", config.seed, config.limit, classes=A_CLASSES)
    b = image_splits("fashion-mnist", config.seed, classes=B_CLASSES)
    run.write_json("split.json", split_record(a.indices, a.data.source, config.seed, dataset="fashion-mnist A",
                                              b_test=len(b.test), b_classes=b.data.classes))
    torch.manual_seed(config.seed)
    model_a = MLP(MLPConfig(28 * 28, len(A_CLASSES), list(config.hidden), config.activation, standardize=False))
    trainer = Trainer(model_a, config, run, a.train, a.val, step=classification_step(AugmentOptions(), 8),
                      metrics=accuracy_metric(8))
    trainer.fit()
    a_test = trainer.evaluate(a.test)["accuracy"]
    save_model(model_a, run.model_dir, extra={"classes": a.data.classes, "image_shape": a.image_shape})

    draws = [task_b(config, model_a, b.train, b.test, config.seed + i) for i in range(config.seeds)]
    for draw in draws:
        run.log(kind="task_b", **draw)
    scratch = np.array([d["scratch"] for d in draws])
    reuse = np.array([d["reuse"] for d in draws])
    results = {"model_a_test_accuracy": a_test, "scratch_mean": float(scratch.mean()), "scratch_std": float(scratch.std()),
               "reuse_mean": float(reuse.mean()), "reuse_std": float(reuse.std()),
               "reuse_wins": int((reuse > scratch).sum()), "seeds": config.seeds, "draws": draws}
    run.write_json("results.json", results)

    report = Report("Transfer learning: Fashion-MNIST task B from 20 images", NAME, "11", a.data.source)
    report.compare("B reusing A's layers, test accuracy (mean ± std)", f"{reuse.mean():.4f} ± {reuse.std():.4f}",
                   BOOK_REUSE, f"{config.seeds} seeds; the book's single picked run")
    report.compare("B from scratch, test accuracy (mean ± std)", f"{scratch.mean():.4f} ± {scratch.std():.4f}",
                   BOOK_SCRATCH, f"{config.seeds} seeds; the book's single picked run")
    report.compare("model A (8 classes), test accuracy", a_test, None, f"{len(a.test):,} test images")
    report.text("Reading", f"Reusing A's layers won {results['reuse_wins']} of {config.seeds} draws. The book "
                           "reports one picked pair and warns that the gain usually shrinks, vanishes or reverses; "
                           "the spread across seeds above is the honest figure. No gate is set on it.")
    report.table("Per seed (test accuracy on 2,000 T-shirt/top and Pullover images)", ["seed", "from scratch",
                 "reusing A", "difference"], [[d["seed"], d["scratch"], d["reuse"], d["reuse"] - d["scratch"]]
                                              for d in draws])
    report.table("Settings", ["setting", "value"], [
        ["MLP", f"784-{'-'.join(map(str, config.hidden))}-8 ({config.activation})"],
        ["model A", f"{len(a.train):,} images of 8 classes, {trainer.epoch} epochs"],
        ["task B", f"{config.b_images} images; reuse: {config.freeze_epochs} epochs frozen, then {config.b_epochs} "
                   f"at lr {config.finetune_lr}; scratch: {config.freeze_epochs + config.b_epochs} epochs at lr {config.lr}"]])
    if (run.plots / "learning_curves.png").exists():
        report.image("Model A learning curves", run.plots / "learning_curves.png", run.path)
    report.write(run.path, time.time() - started)
    return run


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, Any]:
    """Model A reloaded, on the test images of its 8 classes."""
    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    a = image_splits("fashion-mnist", config.seed, config.limit, classes=A_CLASSES)
    return {"model_a_test_accuracy": accuracy(torchbook.load(run.path, map_location=device).model, a.test), "test_images": len(a.test)}


RECIPE = Recipe(NAME, "11", "chapter 11's transfer-learning experiment on Fashion-MNIST, mean ± std over seeds",
                Config, run, evaluate)
