"""Diffusion speed: our U-Net, trainer step and DDIM sampler against diffusers' UNet2DModel, a diffusers-style
training loop and DDIMScheduler, with the same network, weights, batch and steps. Prints images/s and ratios.

    MPLBACKEND=Agg .venv/bin/python benchmarks/diffusion.py [--quality]

Training: `--train-steps` optimizer steps (AdamW, batch `--batch`, Huber loss on the predicted noise at random t of
the book's cosine schedule, T = 4,000) on Fashion-MNIST (digits offline): ours through `torchbook.train.Trainer`
with `denoising_step`, the peer a plain loop as diffusers' training examples write it (`DDPMScheduler.add_noise`,
`UNet2DModel(...).sample`). Sampling: `--sample-steps` DDIM steps for `--batch` images, ours `sample()` with
`DDIM(mode="diffusers")`, the peer a loop over `DDIMScheduler.step` (what `DDIMPipeline` runs, without its image
conversion). Each figure is the best of `--repeats` interleaved timings; the median of the per-repeat ratios is the
steadier figure on a shared machine.

`--quality` also trains both networks from the same initial weights for `--quality-steps` steps each (same data
order, same budget) and gives the Fréchet distance (`torchbook.train.frechet`) of `--fd-samples` DDIM samples of
each against as many test images, once per `--seeds` seed (seed 0 is the earlier single comparison).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from torchbook.data.images import IMAGE_DATASETS
from torchbook.diffusion.sampling import sample, to_images
from torchbook.diffusion.schedulers import DDIM, cosine_schedule
from torchbook.errors import DataUnavailable
from torchbook.models.unet import UNet, UNetConfig
from torchbook.train import TrainConfig, Trainer
from torchbook.train.frechet import feature_extractor, frechet_distance
from torchbook.train.generative import denoising_step, to_model_scale

T = 4000


def load() -> Any:
    for name in ("fashion-mnist", "digits"):
        try:
            return IMAGE_DATASETS[name]()
        except DataUnavailable:
            continue
    raise DataUnavailable("neither Fashion-MNIST nor digits could be loaded")


def unet_config(size: int) -> UNetConfig:
    return UNetConfig(sample_size=size, block_out_channels=[16, 32, 64], layers_per_block=1,
                      down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                      up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], norm_num_groups=8)


def peer_unet(config: UNetConfig) -> Any:
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=config.sample_size, in_channels=1, out_channels=1,
                       block_out_channels=tuple(config.block_out_channels),
                       down_block_types=tuple(config.down_block_types), up_block_types=tuple(config.up_block_types),
                       layers_per_block=config.layers_per_block, attention_head_dim=config.attention_head_dim,
                       norm_num_groups=config.norm_num_groups)


def models(config: UNetConfig, seed: int) -> tuple[UNet, Any]:
    torch.manual_seed(seed)
    ours = UNet(config)
    peer = peer_unet(config)
    peer.load_state_dict(ours.state_dict())
    return ours, peer


def train_ours(model: UNet, images: torch.Tensor, steps: int, batch: int, seed: int) -> float:
    data = TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    config = TrainConfig(epochs=10**6, batch_size=batch, lr=1e-3, optimizer="adamw", max_steps=steps, seed=seed,
                         progress=False, restore_best=False)
    trainer = Trainer(model, config, None, data, step=denoising_step(cosine_schedule(T).alphas_cumprod))
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def train_peer(model: Any, images: torch.Tensor, steps: int, batch: int, seed: int) -> float:
    """The loop of diffusers' train_unconditional example, reduced to its core."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    torch.manual_seed(seed)
    start = time.perf_counter()
    done = 0
    while done < steps:
        order = torch.randperm(len(images))
        for i in range(0, len(order), batch):
            x0 = to_model_scale(images[order[i : i + batch]])
            noise = torch.randn_like(x0)
            t = torch.randint(0, T, (len(x0),))
            pred = model(scheduler.add_noise(x0, noise, t), t).sample
            loss = F.huber_loss(pred, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - start


@torch.no_grad()
def sample_ours(model: UNet, n: int, steps: int, seed: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    x = sample(model, DDIM(cosine_schedule(T), steps, 0.0, "diffusers"), n, (1, model.config.sample_size,
                                                                               model.config.sample_size),
               generator=torch.Generator().manual_seed(seed))
    return time.perf_counter() - start, x


@torch.no_grad()
def sample_peer(model: Any, n: int, steps: int, seed: int) -> tuple[float, torch.Tensor]:
    from diffusers import DDIMScheduler

    model.eval()
    scheduler = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    start = time.perf_counter()
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    size = model.config.sample_size
    x = torch.randn((n, 1, size, size), generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x, eta=0.0, generator=generator).prev_sample
    return time.perf_counter() - start, x


def ratio_line(name: str, ours: list[float], peer: list[float], count: int) -> str:
    best_ours, best_peer = count / min(ours), count / min(peer)
    median = statistics.median(p / o for o, p in zip(ours, peer))
    return (f"{name}: ours {best_ours:,.1f} images/s, diffusers {best_peer:,.1f} images/s, "
            f"ours / diffusers {best_ours / best_peer:.3f} (median {median:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (0: only --quality)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--quality-steps", type=int, default=150)
    parser.add_argument("--fd-samples", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="--quality: one comparison per seed (initial weights, data order, t and noise draws)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers

    data = load()
    images = torch.from_numpy(np.ascontiguousarray(data.images[: len(data.images) - 5000 if data.test_images is not None
                                                               else len(data.images)]))
    config = unet_config(images.shape[-1])
    print(f"{data.name}, U-Net {config.block_out_channels} ({sum(p.numel() for p in UNet(config).parameters()):,} "
          f"parameters), batch {args.batch}, {args.threads} thread(s), torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}")
    train: dict[str, list[float]] = {"ours": [], "peer": []}
    draw: dict[str, list[float]] = {"ours": [], "peer": []}
    for repeat in range(args.repeats):
        ours, peer = models(config, repeat)
        order = [("ours", ours), ("peer", peer)] if repeat % 2 == 0 else [("peer", peer), ("ours", ours)]
        for name, model in order:
            run = train_ours if name == "ours" else train_peer
            train[name].append(run(model, images, args.train_steps, args.batch, repeat))  # type: ignore[operator]
        for name, model in order:
            run_sample = sample_ours if name == "ours" else sample_peer
            draw[name].append(run_sample(model, args.batch, args.sample_steps, repeat)[0])  # type: ignore[operator]
    if args.repeats:
        print(ratio_line(f"training ({args.train_steps} steps)", train["ours"], train["peer"],
                         args.train_steps * args.batch))
        print(ratio_line(f"DDIM sampling ({args.sample_steps} steps)", draw["ours"], draw["peer"], args.batch))
    if args.quality:
        whole = len(images)
        features = feature_extractor(data.images[:whole], data.labels[:whole], len(data.classes), 0, data.name)
        test = data.test_images if data.test_images is not None else data.images
        n = min(args.fd_samples, len(test))
        ratios = []
        for seed in args.seeds:
            ours, peer = models(config, seed)
            train_ours(ours, images, args.quality_steps, args.batch, seed)
            train_peer(peer, images, args.quality_steps, args.batch, seed)
            fd_ours = frechet_distance(features, test[:n], to_images(sample_ours(ours, n, args.sample_steps, seed + 1)[1]))
            fd_peer = frechet_distance(features, test[:n], to_images(sample_peer(peer, n, args.sample_steps, seed + 1)[1]))
            ratios.append(fd_ours / fd_peer)
            print(f"seed {seed}: Fréchet distance after {args.quality_steps} steps each, {n} DDIM samples: ours "
                  f"{fd_ours:.2f}, diffusers {fd_peer:.2f}, ours / diffusers {fd_ours / fd_peer:.3f}", flush=True)
        if len(ratios) > 1:
            print(f"ours / diffusers over {len(ratios)} seeds: median {statistics.median(ratios):.3f}, "
                  f"range {min(ratios):.3f} .. {max(ratios):.3f}")


if __name__ == "__main__":
    main()
