"""`gan`: the book's GAN and DCGAN on Fashion-MNIST (book chapter 18).

`kind=dense`: the book's dense GAN (generator 32-128-256-784); `kind=dcgan`: a DCGAN (transposed convolutions with
batch normalization in the generator, strided convolutions and leaky ReLU in the discriminator). Training goes
through the one trainer: `torchbook.train.generative.GANStep` alternates a discriminator update and a generator
update on each real batch (see its docstring for how, with the trainer's single optimizer). The training trick the
book discusses that is implemented here: one-sided label smoothing (`label_smoothing`); DCGAN's architecture rules.

The report: samples from the same fixed codings after every epoch (to watch the generator learn, or collapse),
mode-collapse diagnostics per epoch (the classes a Fashion-MNIST classifier gives 1,000 generated images: the
entropy of that distribution, log 10 = 2.30 when every class is equally present, and the share of the most
frequent class), both players' losses, and the Fréchet distance of `fd_samples` generated images against as many
test images (`torchbook.train.frechet`). The book prints no figure for these models; the budgets are ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

import torchbook
from torchbook.data.images import IMAGE_DATASETS, standard_split, test_arrays
from torchbook.data.splits import split_record
from torchbook.errors import UserInputError, unknown
from torchbook.hub import save_model
from torchbook.models.gan import GAN, KINDS, GANConfig
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train import TrainConfig, Trainer
from torchbook.train.frechet import PenultimateFeatures, feature_classifier, frechet_distance
from torchbook.train.generative import GANStep

NAME = "gan"


@dataclass
class Config(TrainConfig):
    data: Literal["fashion-mnist", "digits"] = "fashion-mnist"
    kind: str = "dense"  # dense (the book's GAN) or dcgan
    codings: int = 32
    label_smoothing: float = 0.1  # real labels 1 - this for the discriminator (one-sided), 0 = off
    samples_per_epoch: int = 8  # images from fixed codings shown per epoch
    diagnostic_samples: int = 1000  # generated images classified per epoch for the mode-collapse diagnostics
    fd_samples: int = 2000
    limit: int = 0
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "nadam"
    monitor: str = "train_loss"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"data": "digits", "epochs": 2, "limit": 512, "diagnostic_samples": 100, "fd_samples": 100,
                  "batch_size": 64},
        "quick": {"epochs": 5, "batch_size": 64},
        "book": {},
    }

    def validate(self) -> None:
        super().validate()
        if self.kind not in KINDS:
            raise unknown("GAN kind", self.kind, KINDS)
        if not 0 <= self.label_smoothing < 0.5:
            raise UserInputError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")


def prepare(config: Config) -> tuple[Any, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The split (the book's for Fashion-MNIST: 55,000 training images; 65/15/20 for digits; a GAN has no use
    for the validation images), the whole training split (the Fréchet classifier's data) and the test images."""
    data = IMAGE_DATASETS[config.data]()
    splits = standard_split(data, config.seed)
    test = test_arrays(data, splits)[0]
    whole_train = splits["train"]
    if config.limit:
        splits["train"] = splits["train"][: config.limit]
    return data, splits, whole_train, test


class EpochDiagnostics:
    """A trainer callback: after each epoch, images from fixed codings and the mode-collapse diagnostics, logged
    to metrics.jsonl (kind="gan_epoch") and kept as .npy files, so a resumed run's report still has every epoch."""

    def __init__(self, run: RunDir, step: GANStep, codings: torch.Tensor, features: PenultimateFeatures,
                 n_classes: int, diagnostic_samples: int, seed: int):
        self.run, self.step, self.codings, self.features = run, step, codings, features
        self.n_classes, self.diagnostic_samples, self.seed = n_classes, diagnostic_samples, seed

    @torch.no_grad()
    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        gan: Any = trainer.model
        epoch = record["epoch"]
        images = generate(gan, len(self.codings), codings=self.codings)
        folder = self.run.path / "epoch_samples"
        folder.mkdir(exist_ok=True)
        np.save(folder / f"{epoch:04d}.npy", images.numpy())
        many = generate(gan, self.diagnostic_samples, seed=self.seed + epoch)
        predicted = self.features.classifier(many.to(next(self.features.parameters()).device)).argmax(1).cpu()
        share = torch.bincount(predicted, minlength=self.n_classes).float() / len(predicted)
        entropy = max(0.0, float(-(share[share > 0] * share[share > 0].log()).sum()))
        losses = {k: float(np.mean(v)) if v else math.nan for k, v in self.step.losses.items()}
        for values in self.step.losses.values():
            values.clear()
        self.run.log(kind="gan_epoch", epoch=epoch, class_entropy=entropy, top_class_share=float(share.max()),
                     discriminator_loss=losses["discriminator"], generator_loss=losses["generator"])


@torch.no_grad()
def generate(model: GAN, n: int, seed: int = 0, codings: torch.Tensor | None = None) -> torch.Tensor:
    """`n` images (n, H, W) in [0, 1] from random codings (seeded) or the given ones."""
    was_training = model.training
    model.eval()
    if codings is None:
        codings = torch.randn((n, model.config.codings), generator=torch.Generator().manual_seed(seed))
    images = ((model(codings.to(next(model.parameters()).device)) + 1) / 2).clamp(0, 1).cpu()
    model.train(was_training)
    return images


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    data, splits, whole_train, test_images = prepare(config)
    report = Report(f"{'DCGAN' if config.kind == 'dcgan' else 'GAN'} on {data.name}", NAME, "18", data.source)
    run.write_json("split.json", split_record(splits, data.source, config.seed, dataset=data.name))
    image_shape = list(data.images.shape[1:])
    idx = splits["train"]
    train = TensorDataset(torch.from_numpy(np.ascontiguousarray(data.images[idx])), torch.from_numpy(data.labels[idx]))
    classifier = feature_classifier(data.images[whole_train], data.labels[whole_train], len(data.classes),
                                    config.seed, data.name)
    features = PenultimateFeatures(classifier)
    torch.manual_seed(config.seed)
    model = GAN(GANConfig(kind=config.kind, image_size=image_shape, codings=config.codings))
    step = GANStep(config.label_smoothing)
    fixed = torch.randn((config.samples_per_epoch, config.codings), generator=torch.Generator().manual_seed(config.seed))
    diagnostics = EpochDiagnostics(run, step, fixed, features, len(data.classes), config.diagnostic_samples,
                                   config.seed)

    def batches(epoch: int) -> list[list[int]]:
        """The trainer's seeded shuffle, each batch listed twice: discriminator's turn, then generator's."""
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        cut = [order[i : i + config.batch_size].tolist() for i in range(0, len(order), config.batch_size)]
        return [b for batch in cut for b in (batch, batch)]

    trainer = Trainer(model, config, run, train, step=step, batches=batches, callbacks=[diagnostics])
    trainer.fit()
    model.cpu().eval()
    save_model(model, run.model_dir, extra={"classes": data.classes, "image_shape": image_shape})

    n_fd = min(config.fd_samples, len(test_images))
    fd = frechet_distance(features, test_images[:n_fd], generate(model, n_fd, seed=config.seed + 1)) if n_fd else None
    epochs = run.metrics("gan_epoch")
    results: dict[str, Any] = {"frechet_distance": fd, "frechet_samples": n_fd, "dataset": data.name,
                               "kind": config.kind, "epochs": len(epochs)}
    if epochs:
        results.update({k: epochs[-1][k] for k in ("class_entropy", "top_class_share")})
    run.write_json("results.json", results)
    run.log(kind="eval", **{k: v for k, v in results.items() if k != "kind"})

    from torchbook.plots import image_grid, line_plot

    grid = [np.load(run.path / "epoch_samples" / f"{e['epoch']:04d}.npy") for e in epochs]
    if grid:
        image_grid(run.plots / "samples_per_epoch.png", np.concatenate(grid), ncols=config.samples_per_epoch,
                   row_labels=[f"epoch {e['epoch']}" for e in epochs], title="The same codings after each epoch")
        x = [e["epoch"] for e in epochs]
        line_plot(run.plots / "mode_collapse.png",
                  {"class entropy (max 2.30)": (x, [e["class_entropy"] for e in epochs]),
                   "top class share": (x, [e["top_class_share"] for e in epochs])},
                  "Mode-collapse diagnostics: predicted classes of generated images", "epoch", "value")
        line_plot(run.plots / "losses.png", {"discriminator": (x, [e["discriminator_loss"] for e in epochs]),
                                             "generator": (x, [e["generator_loss"] for e in epochs])},
                  "Mean losses per epoch", "epoch", "binary cross-entropy")
    image_grid(run.plots / "samples.png", generate(model, 40, seed=config.seed + 2), ncols=10, title="Samples")
    report.compare(f"Fréchet distance, {n_fd} generated vs {n_fd} test images", fd, None,
                   "classifier features, not Inception's; lower is better; the book prints none")
    if epochs:
        report.compare("class entropy of generated images (last epoch)", results["class_entropy"], None,
                       f"log 10 = {math.log(10):.2f} when all classes are equally present")
        report.compare("share of the most frequent class (last epoch)", results["top_class_share"], None,
                       "0.1 for a balanced generator; near 1 is mode collapse")
        report.image("Samples per epoch", run.plots / "samples_per_epoch.png", run.path)
        report.image("Mode-collapse diagnostics", run.plots / "mode_collapse.png", run.path)
        report.image("Losses", run.plots / "losses.png", run.path)
    report.image("Samples", run.plots / "samples.png", run.path)
    report.write(run.path)
    return run


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, float]:
    """Reload the generator and measure its Fréchet distance again (same seeds, same images)."""
    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    model = torchbook.load(run.path, map_location=device).model
    data, _, whole_train, test_images = prepare(config)
    features = PenultimateFeatures(feature_classifier(data.images[whole_train], data.labels[whole_train],
                                                      len(data.classes), config.seed, data.name))
    n_fd = min(config.fd_samples, len(test_images))
    return {"frechet_distance": frechet_distance(features, test_images[:n_fd], generate(model, n_fd, seed=config.seed + 1))}


def sample_images(run_dir: RunDir | str, n: int = 16, seed: int = 0, **unused: Any) -> torch.Tensor:
    """`torchbook sample`: `n` generated images (n, H, W) in [0, 1]."""
    ignored = [k for k, v in unused.items() if v not in (None, False)]
    if ignored:
        raise UserInputError(f"a GAN samples without {', '.join(ignored)} (diffusion options)")
    return generate(torchbook.load(RunDir.open(run_dir).path).model, n, seed)


RECIPE = Recipe(NAME, "18", "the book's GAN and DCGAN on Fashion-MNIST: samples per epoch, mode-collapse "
                "diagnostics, Fréchet distance", Config, run, evaluate)
