"""`autoencoders`: stacked, convolutional, denoising, sparse and variational autoencoders (book chapter 18).

One run trains one `kind` on Fashion-MNIST (offline alternative: `data=digits`):

- `stacked`: a dense encoder 784-128-32 and its mirror decoder (sizes ours: the book prints none we quote);
- `conv`: two stride-2 convolutions down to 7x7, a 32-d code, transposed convolutions back;
- `denoising`: the stacked one trained on corrupted inputs, `noise=gaussian` (std `noise_level`) or `dropout`;
- `sparse`: the book's KL version, 256 sigmoid coding units, target activation 0.1, weight 1e-3 ("roughly 10%
  sparsity" in the book: the report gives ours);
- `vae`: the variational autoencoder, 32-d codings, loss MSE + KL / 784 (the book's).

The report gives the test reconstruction MSE beside PCA with as many components (the linear autoencoder), sample
reconstructions, a 2-D embedding of the test codings (t-SNE, or PCA for speed), for the VAE generated images and a
latent interpolation, and unsupervised pretraining: a classifier on the trained encoder, fine-tuned with only
`labels` labelled images, against the same classifier trained from scratch on the same images.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

import torchbook
from torchbook.data.images import IMAGE_DATASETS, ImageData, standard_split, test_arrays
from torchbook.data.splits import split_record
from torchbook.devices import device_of
from torchbook.errors import UserInputError, unknown
from torchbook.hub import save_model
from torchbook.models.autoencoder import VAE, Autoencoder, AutoencoderConfig, EncoderClassifier
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train import TrainConfig, Trainer
from torchbook.train.frechet import feature_extractor, frechet_distance
from torchbook.train.generative import autoencoder_step, corrupt

NAME = "autoencoders"
KINDS = ("stacked", "conv", "denoising", "sparse", "vae")
NOISES = ("gaussian", "dropout")
BOOK_SPARSITY_TARGET, BOOK_SPARSITY_WEIGHT, BOOK_SPARSE_UNITS = 0.1, 1e-3, 256


@dataclass
class Config(TrainConfig):
    data: Literal["fashion-mnist", "digits"] = "fashion-mnist"
    kind: str = "stacked"  # stacked, conv, denoising, sparse, vae
    hidden: list[int] = field(default_factory=lambda: [128])
    codings: int = 32  # the code size (sparse: `sparse_units` instead)
    noise: str = "gaussian"  # denoising: gaussian or dropout
    noise_level: float = 0.2  # gaussian: the noise's std; dropout: the rate
    sparse_units: int = BOOK_SPARSE_UNITS
    sparsity_target: float = BOOK_SPARSITY_TARGET
    sparsity_weight: float = BOOK_SPARSITY_WEIGHT
    fd_samples: int = 2000  # VAE: generated images for the Fréchet distance against as many test images (0: skip)
    embedding: str = "tsne"  # tsne or pca, for the 2-D plot of the test codings
    labels: int = 500  # labelled images of the pretraining experiment (0: skip it)
    classifier_epochs: int = 30
    limit: int = 0  # use only this many training images (0 = all)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"data": "digits", "epochs": 2, "limit": 600, "lr": 1e-2, "embedding": "pca", "labels": 100,
                  "classifier_epochs": 3, "hidden": [32], "codings": 8, "sparse_units": 32},
        "quick": {"epochs": 10, "embedding": "pca", "labels": 200, "classifier_epochs": 30},
        "book": {},
    }

    def validate(self) -> None:
        super().validate()
        if self.kind not in KINDS:
            raise unknown("autoencoder kind", self.kind, KINDS)
        if self.noise not in NOISES:
            raise unknown("noise", self.noise, NOISES)
        if self.embedding not in ("tsne", "pca"):
            raise unknown("embedding", self.embedding, ["tsne", "pca"])
        if self.noise == "dropout" and not 0 <= self.noise_level < 1:
            raise UserInputError(f"noise_level={self.noise_level} must be a dropout rate in [0, 1)")


@dataclass
class Prepared:
    data: ImageData
    splits: dict[str, np.ndarray]
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    classifier_train: np.ndarray  # the whole training split (before `limit`): the Fréchet classifier's data


def prepare(config: Config) -> Prepared:
    """Fashion-MNIST: the last 5,000 training images validate, the official test set tests; digits: 65/15/20."""
    data = IMAGE_DATASETS[config.data]()
    splits = standard_split(data, config.seed)
    test = TensorDataset(*(torch.from_numpy(np.ascontiguousarray(a)) for a in test_arrays(data, splits)))
    classifier_train = splits["train"]
    if config.limit:
        splits["train"] = splits["train"][: config.limit]

    def tensors(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(data.images[idx])), torch.from_numpy(data.labels[idx]))

    return Prepared(data, splits, tensors(splits["train"]), tensors(splits["val"]), test, classifier_train)


def model_config(config: Config, image_shape: tuple[int, ...]) -> AutoencoderConfig:
    sparse = config.kind == "sparse"
    return AutoencoderConfig(
        kind={"conv": "conv", "vae": "vae"}.get(config.kind, "dense"),
        image_size=list(image_shape),
        hidden=list(config.hidden),
        codings=config.sparse_units if sparse else config.codings,
        sparse=sparse,
    )


def build_model(config: AutoencoderConfig) -> Autoencoder | VAE:
    return VAE(config) if config.kind == "vae" else Autoencoder(config)


def training_step(config: Config, pixels: int) -> Any:
    return autoencoder_step(
        noise=config.noise if config.kind == "denoising" else "none",
        noise_level=config.noise_level,
        sparsity_target=config.sparsity_target,
        sparsity_weight=config.sparsity_weight if config.kind == "sparse" else 0.0,
        kl_weight=1.0 / pixels if config.kind == "vae" else 0.0,
    )


@torch.no_grad()
def reconstruct(model: Autoencoder | VAE, images: torch.Tensor) -> torch.Tensor:
    """The reconstruction of each image through the codings' mean (no sampling, for the VAE)."""
    model.eval()
    return torch.cat([model.decode(model.encode(chunk)) for chunk in images.split(1000)])


@torch.no_grad()
def codings_of(model: Autoencoder | VAE, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model.encode(chunk) for chunk in images.split(1000)])


def pca_mse(train: np.ndarray, test: np.ndarray, components: int) -> float:
    """The linear autoencoder's reconstruction error: PCA with `components` components fitted on `train`."""
    from sklearn.decomposition import PCA

    pca = PCA(components, random_state=0).fit(train.reshape(len(train), -1))
    flat = test.reshape(len(test), -1)
    return float(np.mean((pca.inverse_transform(pca.transform(flat)) - flat) ** 2))


def embedding_plot(path: Path, codings: np.ndarray, labels: np.ndarray, classes: list[str], method: str,
                   seed: int) -> None:
    from torchbook.plots import plt, save_figure

    if method == "tsne":
        from sklearn.manifold import TSNE

        points = TSNE(2, init="pca", random_state=seed).fit_transform(codings)
    else:
        from sklearn.decomposition import PCA

        points = PCA(2, random_state=seed).fit_transform(codings)
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=4)
    ax.legend(scatter.legend_elements()[0], classes, fontsize=7, markerscale=0.8, loc="best")
    ax.set_title(f"Test codings in 2-D ({method.upper()})")
    ax.set_xticks([])
    ax.set_yticks([])
    save_figure(fig, path)


def pretraining_experiment(autoencoder: Autoencoder | VAE, config: Config, prep: Prepared) -> dict[str, float]:
    """The same classifier (encoder + linear head) trained on `config.labels` labelled images, from the trained
    encoder and from scratch; test accuracy of each (chapter 18's unsupervised pretraining)."""
    import torchmetrics

    n_classes = len(prep.data.classes)
    images, targets = prep.train.tensors
    few = TensorDataset(images[: config.labels], targets[: config.labels])
    classifier_config = dataclasses.replace(config, epochs=config.classifier_epochs, patience=0, max_steps=0,
                                            checkpoint_every=0)
    metrics = {"accuracy": lambda: torchmetrics.classification.MulticlassAccuracy(num_classes=n_classes,
                                                                                  average="micro")}
    results = {}
    for name, body in (("pretrained", copy.deepcopy(autoencoder)), ("scratch", None)):
        torch.manual_seed(config.seed)
        classifier = EncoderClassifier(body if body is not None else build_model(autoencoder.config), n_classes)
        trainer = Trainer(classifier, classifier_config, None, few, prep.val,
                          criterion=torch.nn.CrossEntropyLoss(), metrics=metrics)
        trainer.fit()
        results[f"{name}_test_accuracy"] = trainer.evaluate(prep.test)["accuracy"]
    return results


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    prep = prepare(config)
    data = prep.data
    report = Report(f"Autoencoder ({config.kind}) on {data.name}", NAME, "18", data.source)
    run.write_json("split.json", split_record(prep.splits, data.source, config.seed, dataset=data.name))
    image_shape = tuple(data.images.shape[1:])
    pixels = int(np.prod(image_shape))
    torch.manual_seed(config.seed)
    model = build_model(model_config(config, image_shape))
    trainer = Trainer(model, config, run, prep.train, prep.val, step=training_step(config, pixels))
    trainer.fit()
    model.cpu().eval()
    save_model(model, run.model_dir, extra={"classes": data.classes, "image_shape": list(image_shape)})

    test_images, test_labels = prep.test.tensors
    recon = reconstruct(model, test_images)
    codings = codings_of(model, test_images)
    mse = float(torch.mean((recon - test_images) ** 2))
    size = model.config.codings
    baseline = pca_mse(prep.train.tensors[0].numpy(), test_images.numpy(), min(size, pixels))
    results: dict[str, Any] = {"autoencoder": config.kind, "test_reconstruction_mse": mse, "pca_same_size_mse": baseline,
                               "codings": size, "dataset": data.name}
    report.compare("test reconstruction MSE", mse, None, "the book prints no reconstruction error")
    report.compare(f"PCA with {size} components (linear autoencoder)", baseline, None, "same train and test images")
    if config.kind == "denoising":
        torch.manual_seed(config.seed)  # the same corrupted test images on every evaluation
        noisy = corrupt(test_images, config.noise, config.noise_level)
        denoised = float(torch.mean((reconstruct(model, noisy) - test_images) ** 2))
        results["noisy_input_mse"] = float(torch.mean((noisy - test_images) ** 2))
        results["denoised_mse"] = denoised
        report.compare(f"MSE of the denoised test images ({config.noise} noise {config.noise_level})", denoised, None,
                       f"the noisy inputs themselves: {results['noisy_input_mse']:.4f}")
    if config.kind == "sparse":
        mean_activation = float(codings.mean())
        results["mean_coding_activation"] = mean_activation
        results["active_fraction"] = float((codings > 0.5).float().mean())
        report.compare("mean activation of the coding units", mean_activation, config.sparsity_target,
                       "book: target 0.1, 'roughly 10% sparsity'")
        report.compare("fraction of coding activations above 0.5", results["active_fraction"], None, "")
    from torchbook.plots import image_grid

    shown = torch.cat([test_images[:10], recon[:10]])
    image_grid(run.plots / "reconstructions.png", shown, ncols=10, row_labels=["original", "reconstruction"],
               title=f"{config.kind} autoencoder, test images")
    report.image("Reconstructions", run.plots / "reconstructions.png", run.path)
    n_points = min(len(codings), 2000)
    embedding_plot(run.plots / "embedding.png", codings[:n_points].numpy(), test_labels[:n_points].numpy(),
                   data.classes, config.embedding, config.seed)
    report.image("Embedding of the test codings", run.plots / "embedding.png", run.path)
    if config.kind == "vae":
        assert isinstance(model, VAE)
        image_grid(run.plots / "generated.png", generate(model, 30, seed=config.seed), ncols=10,
                   title="VAE: decoded codings drawn from N(0, I)")
        report.image("Generated images", run.plots / "generated.png", run.path)
        image_grid(run.plots / "interpolation.png", interpolate(model, test_images[:5], test_images[5:10]), ncols=8,
                   title="VAE: linear interpolation between the codings of two test images")
        report.image("Latent interpolation", run.plots / "interpolation.png", run.path)
        if config.fd_samples:
            n_fd = min(config.fd_samples, len(test_images))
            train_idx = prep.classifier_train
            extractor = feature_extractor(data.images[train_idx], data.labels[train_idx], len(data.classes),
                                          config.seed, data.name)
            results["frechet_distance"] = frechet_distance(extractor, test_images[:n_fd],
                                                           generate(model, n_fd, seed=config.seed + 1))
            results["frechet_samples"] = n_fd
            report.compare(f"Fréchet distance, {n_fd} generated vs {n_fd} test images", results["frechet_distance"],
                           None, "classifier features, not Inception's; lower is better")
    if config.labels:
        pre = pretraining_experiment(model, config, prep)
        results.update(pre)
        report.compare(f"classifier on {config.labels} labels, pretrained encoder: test accuracy",
                       pre["pretrained_test_accuracy"], None, "encoder + linear head, fine-tuned")
        report.compare(f"same classifier from scratch on the same {config.labels} labels",
                       pre["scratch_test_accuracy"], None, "same epochs, same seed")
    run.write_json("results.json", results)
    run.log(kind="eval", **results)
    report.table("Data split", ["split", "images"], [[k, len(v)] for k, v in prep.splits.items()])
    report.image("Learning curves", run.plots / "learning_curves.png", run.path)
    report.write(run.path)
    return run


@torch.no_grad()
def generate(model: VAE, n: int, seed: int = 0) -> torch.Tensor:
    """`n` new images (n, H, W) in [0, 1]: codings drawn from the prior N(0, I), decoded."""
    model.eval()
    z = torch.randn((n, model.config.codings), generator=torch.Generator().manual_seed(seed))
    return model.decode(z.to(next(model.parameters()).device)).cpu()


@torch.no_grad()
def interpolate(model: VAE, start: torch.Tensor, end: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """For each pair (start[i], end[i]): `steps` decoded images between their codings, (pairs * steps, H, W)."""
    model.eval()
    a, b = model.encode(start), model.encode(end)
    weights = torch.linspace(0, 1, steps)
    rows = [model.decode(torch.stack([(1 - w) * a[i] + w * b[i] for w in weights])) for i in range(len(a))]
    return torch.cat(rows)


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, float]:
    """Reload the saved autoencoder on `device` and measure its test reconstruction MSE again."""
    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    model = torchbook.load(run.path, map_location=device).model
    images = prepare(config).test.tensors[0].to(device_of(model))
    return {"test_reconstruction_mse": float(torch.mean((reconstruct(model, images) - images) ** 2))}


RECIPE = Recipe(NAME, "18", "stacked, convolutional, denoising, sparse (KL) and variational autoencoders on "
                "Fashion-MNIST; pretraining for a classifier with few labels", Config, run, evaluate)


def sample_images(run_dir: RunDir | str, n: int = 16, seed: int = 0, **unused: Any) -> torch.Tensor:
    """`torchbook sample`: `n` images (n, H, W) in [0, 1] decoded from codings drawn from N(0, I) (VAE runs)."""
    run = RunDir.open(run_dir)
    model = torchbook.load(run.path).model
    if not isinstance(model, VAE):
        raise UserInputError(f"{str(run.path)!r} holds a {run.load_config(Config).kind} autoencoder, which does not "
                             "generate; sample a vae run")
    ignored = [k for k, v in unused.items() if v not in (None, False)]
    if ignored:
        raise UserInputError(f"a VAE samples without {', '.join(ignored)} (diffusion options)")
    return generate(model, n, seed)
