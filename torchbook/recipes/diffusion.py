"""`diffusion`: a denoising diffusion model on Fashion-MNIST, sampled with DDPM and DDIM (book chapter 18).

The book's settings: the cosine variance schedule of equation 18-7 with T = 4,000 steps and s = 0.008, a U-Net that
predicts the noise added to an image, trained with a Huber loss; sampling with DDIM (equation 18-9, the book's
default 50 steps, eta 0.85) and, in the `book` preset only, with DDPM's full 4,000 steps. We add classifier-free
guidance on the class (the label is dropped with probability `p_uncond` in training). The sampler is kept apart
from the model (`torchbook.diffusion`), in `book` or `diffusers` mode.

The book prints no training budget (epochs, batch size) or sample-quality figure for this model, so those settings
are ours. Quality here: the validation denoising loss against two baselines (predicting no noise; the exact denoiser
of a per-pixel Gaussian model of the images), and sample grids. The `book` preset trains for about 10 hours on one
CPU core (30 images/s; resumable with `--resume`), and its 16 DDPM samples take about 20 minutes more.

Data: Fashion-MNIST (the last 5,000 training images validate); offline alternative `data=digits` (8x8).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

import torchbook
from torchbook.data.images import IMAGE_DATASETS, ImageData, standard_split, test_arrays
from torchbook.data.splits import split_record
from torchbook.diffusion.sampling import null_class, sample, to_images
from torchbook.diffusion.schedulers import DDIM, DDPM, MODES, VarianceSchedule, cosine_schedule
from torchbook.errors import UserInputError, unknown
from torchbook.hub import save_model
from torchbook.models.unet import UNet, UNetConfig
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train import TrainConfig, Trainer
from torchbook.train.frechet import feature_extractor, frechet_distance
from torchbook.train.generative import LOSSES, EMAModel, EMAUpdate, denoising_step, noise_loss, to_model_scale

NAME = "diffusion"
BOOK_T, BOOK_S, BOOK_DDIM_STEPS, BOOK_ETA = 4000, 0.008, 50, 0.85


@dataclass
class Config(TrainConfig):
    data: Literal["fashion-mnist", "digits"] = "fashion-mnist"
    timesteps: int = BOOK_T  # T of equation 18-7
    cosine_s: float = BOOK_S  # s of equation 18-7
    loss: str = "huber"  # huber (the book's), mse, mae
    conditional: bool = True  # class embedding + classifier-free guidance
    p_uncond: float = 0.1  # probability of training on "no class" instead of the label
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention_stages: int = 1  # self-attention in this many of the coarsest stages (and always in the middle)
    layers_per_block: int = 2
    norm_num_groups: int = 8
    dropout: float = 0.0
    ema_decay: float = 0.0  # > 0: evaluate, sample and save an exponential moving average of the weights
    sampler: str = "book"  # book or diffusers (see torchbook.diffusion.schedulers)
    ddim_steps: int = BOOK_DDIM_STEPS
    eta: float = BOOK_ETA
    clip_sample: float = 1.0  # clamp DDIM's predicted clean image to [-1, 1], the data's range (0: off, see DDIM)
    guidance: float = 2.0  # classifier-free guidance scale of the report's class-conditional grid
    samples_per_class: int = 8
    ddpm_samples: int = 0  # images sampled with the full T-step DDPM (T model calls each batch: slow on CPU)
    fd_samples: int = 2000  # DDIM samples for the Fréchet distance against as many test images (0: skip)
    fd_guidance: float = 2.0  # guidance of those samples (1: the conditional model alone, one pass a step; after 1,800
    # steps of the gate preset the distance at 1 / 2 / 3 / 5 was 75.1 / 56.3 / 60.9 / 85.2, docs/generative.md)
    limit: int = 0  # use only this many training images (0 = all)
    val_limit: int = 0  # validate on only this many images (0 = all)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    grad_clip: float = 1.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"data": "digits", "epochs": 1, "limit": 256, "val_limit": 64, "block_out_channels": [16, 32],
                  "layers_per_block": 1, "ddim_steps": 5, "samples_per_class": 1, "batch_size": 32, "fd_samples": 64},
        "quick": {"epochs": 1, "limit": 9600, "val_limit": 1000, "block_out_channels": [16, 32, 64],
                  "layers_per_block": 1, "lr": 2e-3, "ema_decay": 0.995, "samples_per_class": 4, "fd_samples": 200},
        # DDIM's Fréchet distance against the VAE's (tests/test_diffusion.py, slow): ~35 CPU minutes of one thread
        "gate": {"epochs": 6, "max_steps": 4800, "restore_best": False, "val_limit": 1000,
                 "block_out_channels": [16, 32, 64], "layers_per_block": 1, "lr": 2e-3, "ema_decay": 0.995,
                 "samples_per_class": 4, "fd_samples": 500, "checkpoint_every": 1200, "keep_checkpoints": 3},
        "book": {"ddpm_samples": 16},
    }

    def validate(self) -> None:
        super().validate()
        if self.loss not in LOSSES:
            raise unknown("loss", self.loss, LOSSES)
        if self.sampler not in MODES:
            raise unknown("sampler", self.sampler, MODES)
        if not 1 <= self.ddim_steps <= self.timesteps:
            raise UserInputError(f"ddim_steps={self.ddim_steps} must be between 1 and timesteps={self.timesteps}")
        if not 0 <= self.p_uncond <= 1:
            raise UserInputError(f"p_uncond={self.p_uncond} must be a probability")
        if self.clip_sample < 0:
            raise UserInputError(f"clip_sample={self.clip_sample} must be positive (the clamp's bound) or 0 (off)")
        if not 0 <= self.ema_decay < 1:
            raise UserInputError(f"ema_decay={self.ema_decay} must be in [0, 1) (0: no average)")
        if not 0 <= self.attention_stages <= len(self.block_out_channels):
            raise UserInputError(f"attention_stages={self.attention_stages} must be between 0 and "
                                 f"{len(self.block_out_channels)} (the number of stages)")


@dataclass
class Prepared:
    data: ImageData
    splits: dict[str, np.ndarray]
    train: TensorDataset
    val: TensorDataset
    test_images: np.ndarray
    classifier_train: np.ndarray  # the whole training split (before `limit`): the Fréchet classifier's data


def prepare(config: Config) -> Prepared:
    """The book's split for Fashion-MNIST (the last 5,000 training images validate, the official test set); a
    stratified 65/15/20 one for digits."""
    data = IMAGE_DATASETS[config.data]()
    splits = standard_split(data, config.seed)
    test_images = test_arrays(data, splits)[0]
    classifier_train = splits["train"]
    if config.limit:
        splits["train"] = splits["train"][: config.limit]
    if config.val_limit:
        splits["val"] = splits["val"][: config.val_limit]

    def tensors(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(data.images[idx])), torch.from_numpy(data.labels[idx]))

    return Prepared(data, splits, tensors(splits["train"]), tensors(splits["val"]), test_images, classifier_train)


def unet_config(config: Config, image_shape: tuple[int, int], n_classes: int) -> UNetConfig:
    stages = len(config.block_out_channels)
    attn = [i >= stages - config.attention_stages for i in range(stages)]
    return UNetConfig(
        sample_size=image_shape[0],
        block_out_channels=list(config.block_out_channels),
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        dropout=config.dropout,
        num_class_embeds=n_classes + 1 if config.conditional else None,
    )


def schedule_of(config: Config) -> VarianceSchedule:
    return cosine_schedule(config.timesteps, config.cosine_s)


@torch.no_grad()
def denoising_loss(model: torch.nn.Module, dataset: TensorDataset, schedule: VarianceSchedule, loss: str,
                   pixel_stats: tuple[torch.Tensor, torch.Tensor], seed: int = 0,
                   batch_size: int = 256) -> dict[str, float]:
    """The noise-prediction loss on `dataset` at seeded t and noise (the same draws for every model), beside two
    baselines: predicting no noise, and the exact denoiser of a per-pixel Gaussian model of the images
    (`pixel_stats` = mean and variance of each pixel of the training images, in the model's [-1, 1] scale):
    E[noise | x_t] = sqrt(1 - a) (x_t - sqrt(a) mean) / (a var + 1 - a), a = alpha_bar_t. Beating the latter means
    the model learned more than each pixel's mean and spread."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    none = null_class(model)
    mean, var = pixel_stats
    sums = {"denoising_loss": 0.0, "zero_noise_baseline_loss": 0.0, "gaussian_baseline_loss": 0.0}
    images, labels = dataset.tensors
    for start in range(0, len(images), batch_size):
        x0 = to_model_scale(images[start : start + batch_size])
        t = torch.randint(0, schedule.num_steps, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = schedule.add_noise(x0, noise, t)
        args = () if none is None else (labels[start : start + batch_size].to(device),)
        a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        predictions = {
            "denoising_loss": model(x_t.to(device), t.to(device), *args).cpu(),
            "zero_noise_baseline_loss": torch.zeros_like(noise),
            "gaussian_baseline_loss": (1 - a) ** 0.5 * (x_t - a**0.5 * mean) / (a * var + 1 - a),
        }
        for key, pred in predictions.items():
            sums[key] += float(noise_loss(pred, noise, loss)) * len(x0)
    return {key: value / len(images) for key, value in sums.items()}


def pixel_stats(dataset: TensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's mean and variance over `dataset`'s images, in the model's scale: (1, C, H, W) each."""
    x = to_model_scale(dataset.tensors[0])
    return x.mean(0, keepdim=True), x.var(0, keepdim=True)


def generate(model: UNet, config: Config, n: int, steps: int | None = None, eta: float | None = None,
             guidance: float | None = None, class_label: int | None = None, seed: int = 0,
             labels: torch.Tensor | None = None, ddpm: bool = False, progress: bool = False) -> torch.Tensor:
    """`n` images (n, H, W) in [0, 1] from a trained model: DDIM with `steps` jumps and `eta` (default: the
    config's), or DDPM over all T steps (`ddpm=True`). A class-conditional model samples `class_label` (or
    `labels`, or random classes) with classifier-free guidance `guidance` (default: the config's)."""
    schedule = schedule_of(config)
    scheduler: DDPM | DDIM = (DDPM(schedule, config.sampler) if ddpm else
                              DDIM(schedule, steps or config.ddim_steps, config.eta if eta is None else eta, config.sampler,
                                   clip_sample=config.clip_sample or None))
    n_classes = null_class(model)
    generator = torch.Generator().manual_seed(seed)
    if n_classes is not None and labels is None:
        if class_label is not None:
            if not 0 <= class_label < n_classes:
                raise UserInputError(f"class {class_label} is not one of this model's classes 0..{n_classes - 1}")
            labels = torch.full((n,), class_label, dtype=torch.long)
        else:
            labels = torch.randint(0, n_classes, (n,), generator=generator)
    elif n_classes is None and class_label is not None:
        raise UserInputError("this model was trained without classes: sample it without a class")
    c = model.config
    x = sample(model, scheduler, n, (c.in_channels, c.sample_size, c.sample_size), labels,
               config.guidance if guidance is None else guidance, generator, progress=progress)
    return to_images(x)


class CpuClock:
    """CPU seconds of this process (`time.process_time`, all threads) spent in each phase of a run: unlike the
    wall-clock time, it does not grow when other processes share the cores."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.last = time.process_time()

    def lap(self, phase: str) -> None:
        now = time.process_time()
        self.laps[phase] = round(now - self.last, 2)
        self.last = now


def forward_process_plot(path: Path, image: np.ndarray, schedule: VarianceSchedule, seed: int) -> None:
    """One image noised in one jump at several steps t (the forward process of equation 18-7)."""
    from torchbook.plots import image_grid

    T = schedule.num_steps
    steps = [0, T // 20, T // 10, T // 5, 2 * T // 5, 3 * T // 5, 4 * T // 5, T - 1]
    x0 = to_model_scale(torch.from_numpy(image)[None]).expand(len(steps), -1, -1, -1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    noisy = schedule.add_noise(x0, noise, torch.tensor(steps))
    image_grid(path, to_images(noisy), ncols=len(steps), col_labels=[f"t={t + 1}" for t in steps],
               title="Forward process: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise")


def schedule_plot(path: Path, schedule: VarianceSchedule) -> None:
    from torchbook.plots import line_plot

    steps = list(range(1, schedule.num_steps + 1))
    line_plot(path, {"alpha_bar_t": (steps, schedule.alphas_cumprod.tolist()), "beta_t": (steps, schedule.betas.tolist())},
              f"Cosine variance schedule (equation 18-7), T = {schedule.num_steps}", "t", "value")


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    cpu = CpuClock()
    prep = prepare(config)
    data = prep.data
    report = Report(f"Diffusion model (DDPM/DDIM) on {data.name}", NAME, "18", data.source)
    run.write_json("split.json", split_record(prep.splits, data.source, config.seed, dataset=data.name))
    image_shape = tuple(data.images.shape[1:])
    schedule = schedule_of(config)
    torch.manual_seed(config.seed)
    unet = UNet(unet_config(config, image_shape, len(data.classes)))  # type: ignore[arg-type]
    step = denoising_step(schedule.alphas_cumprod, config.loss, config.p_uncond, null_class(unet))
    trained: torch.nn.Module = EMAModel(unet, config.ema_decay) if config.ema_decay else unet
    trainer = Trainer(trained, config, run, prep.train, prep.val, step=step,
                      callbacks=[EMAUpdate()] if config.ema_decay else [])
    cpu.lap("data and setup")
    trainer.fit()
    cpu.lap("training")
    model: UNet = trainer.model.ema if isinstance(trainer.model, EMAModel) else trainer.model  # type: ignore[assignment]
    model.cpu().eval()
    save_model(model, run.model_dir, extra={"classes": data.classes, "image_shape": list(image_shape)})

    losses = denoising_loss(model, prep.val, schedule, config.loss, pixel_stats(prep.train), seed=config.seed)
    results: dict[str, Any] = {**losses, "dataset": data.name, "parameters": sum(p.numel() for p in model.parameters()),
                               "train_images": len(prep.splits["train"]), "optimizer_steps": trainer.global_step}
    cpu.lap("validation losses")
    n_classes = len(data.classes)
    per_class = config.samples_per_class
    if config.conditional:
        labels = torch.arange(n_classes).repeat_interleave(per_class)
        grid = generate(model, config, len(labels), labels=labels, seed=config.seed)
        row_labels = data.classes
    else:
        grid = generate(model, config, n_classes * per_class, seed=config.seed)
        row_labels = None
    from torchbook.plots import image_grid

    what = f"DDIM ({config.sampler} mode), {config.ddim_steps} steps, eta {config.eta}"
    guidance = f", guidance {config.guidance}" if config.conditional else ""
    image_grid(run.plots / "samples_ddim.png", grid, ncols=per_class, row_labels=row_labels, title=what + guidance)
    cpu.lap(f"sample grid ({len(grid)} images, {config.ddim_steps} DDIM steps)")
    if config.ddpm_samples:
        ddpm = generate(model, config, config.ddpm_samples, ddpm=True, seed=config.seed)
        image_grid(run.plots / "samples_ddpm.png", ddpm, ncols=8, title=f"DDPM, all {schedule.num_steps} steps")
        cpu.lap(f"DDPM samples ({config.ddpm_samples} images, {schedule.num_steps} steps)")
    if config.fd_samples:
        n_fd = min(config.fd_samples, len(prep.test_images))
        fd_images = generate(model, config, n_fd, guidance=config.fd_guidance, seed=config.seed + 1)
        cpu.lap(f"Fréchet samples ({n_fd} images, {config.ddim_steps} DDIM steps)")
        extractor = feature_extractor(data.images[prep.classifier_train], data.labels[prep.classifier_train],
                                      n_classes, config.seed, data.name)
        results["frechet_distance"] = frechet_distance(extractor, prep.test_images[:n_fd], fd_images)
        results["frechet_samples"] = n_fd
        cpu.lap("Fréchet classifier (cached after the first run) and distance")
        report.compare(f"Fréchet distance, {n_fd} DDIM samples vs {n_fd} test images", results["frechet_distance"],
                       None, f"classifier features, not Inception's; guidance {config.fd_guidance}; lower is better")
    forward_process_plot(run.plots / "forward_process.png", data.images[prep.splits["val"][0]], schedule, config.seed)
    schedule_plot(run.plots / "schedule.png", schedule)
    cpu.lap("plots")
    results["cpu_seconds"] = cpu.laps
    run.write_json("results.json", results)
    run.log(kind="eval", **results)

    report.compare("validation denoising loss (seeded t and noise)", losses["denoising_loss"], None,
                   f"{config.loss}; the book prints no figure")
    report.compare("baseline: predict no noise", losses["zero_noise_baseline_loss"], None, "same images, t and noise")
    report.compare("baseline: per-pixel Gaussian denoiser", losses["gaussian_baseline_loss"], None,
                   "exact if pixels were independent Gaussians; same draws")
    report.compare("T, s (equation 18-7)", f"{config.timesteps}, {config.cosine_s}", f"{BOOK_T}, {BOOK_S}")
    report.compare("DDIM steps, eta", f"{config.ddim_steps}, {config.eta}", f"{BOOK_DDIM_STEPS}, {BOOK_ETA}",
                   "the book's generate_ddim defaults; its figure uses 500 steps")
    if config.ema_decay:
        report.text("Weights", f"Losses and samples use the exponential moving average of the weights (decay "
                               f"{config.ema_decay}); the learning curves show the trained weights themselves.")
    verdict = "beats" if losses["denoising_loss"] < losses["gaussian_baseline_loss"] else "does NOT beat"
    report.text("Verdict", f"The U-Net ({results['parameters']:,} parameters, {trainer.global_step} optimizer steps "
                           f"on {len(prep.splits['train']):,} images) {verdict} the per-pixel Gaussian denoiser "
                           f"on validation ({losses['denoising_loss']:.4f} vs {losses['gaussian_baseline_loss']:.4f}).")
    report.table("Where the time goes: CPU seconds of this process (all threads; the wall-clock time above also counts "
                 "waiting for a loaded machine)", ["phase", "CPU s"],
                 [[k, f"{v:.1f}"] for k, v in cpu.laps.items()] + [["total", f"{sum(cpu.laps.values()):.1f}"]])
    report.table("Data split", ["split", "images"], [[k, len(v)] for k, v in prep.splits.items()])
    report.image("Learning curves", run.plots / "learning_curves.png", run.path)
    report.image("Samples: " + what + guidance, run.plots / "samples_ddim.png", run.path)
    if config.ddpm_samples:
        report.image(f"Samples: DDPM, {schedule.num_steps} steps", run.plots / "samples_ddpm.png", run.path)
    report.image("Forward process", run.plots / "forward_process.png", run.path)
    report.image("Variance schedule", run.plots / "schedule.png", run.path)
    report.write(run.path)
    return run


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, float]:
    """Reload the saved model on `device` and measure its validation denoising loss again (same seeded t and
    noise)."""
    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    model = torchbook.load(run.path, map_location=device).model
    prep = prepare(config)
    return denoising_loss(model, prep.val, schedule_of(config), config.loss, pixel_stats(prep.train), seed=config.seed)


RECIPE = Recipe(NAME, "18", "DDPM on Fashion-MNIST (cosine schedule, U-Net), DDIM sampling, classifier-free guidance "
                "(offline: digits)", Config, run, evaluate)


def sample_images(run_dir: RunDir | str, n: int = 16, steps: int | None = None, eta: float | None = None,
                  guidance: float | None = None, class_label: int | None = None, seed: int = 0,
                  ddpm: bool = False, progress: bool = False) -> torch.Tensor:
    """`torchbook sample`: `n` images (n, H, W) in [0, 1] from a finished run's model (see `generate`)."""
    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    model = torchbook.load(run.path).model
    return generate(model, config, n, steps, eta, guidance, class_label, seed, ddpm=ddpm, progress=progress)
