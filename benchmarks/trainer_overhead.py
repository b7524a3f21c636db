"""Trainer overhead: the book's MLP trained by a minimal hand-written PyTorch loop, by torchbook's Trainer and by
PyTorch Lightning's Trainer, in one run, fp32 and bf16. Prints steps/s of each and the ratios.

    MPLBACKEND=Agg TORCHBOOK_MIRROR=../shared/data .venv/bin/python benchmarks/trainer_overhead.py

Same model (784-300-100-10 on Fashion-MNIST, or 64-300-100-10 on scikit-learn's digits offline), same data, same
batch size, optimizer (SGD with momentum, the book's), seeded shuffling every epoch; no validation, logging or
checkpoints in any of them. Each figure is the best of `--repeats` interleaved timings of the training phase.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchbook.errors import DataUnavailable
from torchbook.models.mlp import MLP, MLPConfig
from torchbook.train import TrainConfig, Trainer

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def load_images() -> tuple[str, torch.Tensor, torch.Tensor]:
    from torchbook.data.images import IMAGE_DATASETS

    for name in ("fashion-mnist", "digits"):
        try:
            data = IMAGE_DATASETS[name]()
        except DataUnavailable:
            continue
        x = torch.from_numpy(np.ascontiguousarray(data.images)).flatten(1)
        return data.name, x, torch.from_numpy(data.labels).long()
    raise DataUnavailable("neither Fashion-MNIST nor digits could be loaded")


def build_model(n_in: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(MLPConfig(n_in, 10, [300, 100], "relu", 0.0, standardize=False))


def hand_written(x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, precision: str) -> tuple[float, int]:
    """The loop of the book's chapter 10, nothing more."""
    model = build_model(x.shape[1], 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    dtype = AUTOCAST[precision]
    steps = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = criterion(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    return time.perf_counter() - start, steps


class Clock:
    """Times the training phase (after setup) in both trainers' callbacks."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.steps = 0

    def on_fit_start(self, trainer: Any) -> None:
        self.start = time.perf_counter()

    def on_fit_end(self, trainer: Any) -> None:
        self.end = time.perf_counter()
        self.steps = trainer.global_step


def torchbook_trainer(x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, precision: str) -> tuple[float, int]:
    model = build_model(x.shape[1], 0)
    config = TrainConfig(epochs=epochs, batch_size=batch, lr=0.01, optimizer="sgd", momentum=0.9, device="cpu",
                         precision=precision, progress=False, restore_best=False, log_every=0)
    clock = Clock()
    Trainer(model, config, None, TensorDataset(x, y), criterion=nn.CrossEntropyLoss(), callbacks=[clock]).fit()
    return clock.end - clock.start, clock.steps


class BatchedTensors(TensorDataset):
    """Lightning's DataLoader fetches a whole batch at once (`__getitems__`), so neither side pays per-example
    collation: the comparison is of the trainers, not of data loading."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def lightning_trainer(x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, precision: str) -> tuple[float, int]:
    import logging
    import warnings

    import pytorch_lightning as pl

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model(x.shape[1], 0)
            self.criterion = nn.CrossEntropyLoss()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, target = batch
            return self.criterion(self.model(inputs), target)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class LightningClock(pl.Callback):
        def __init__(self) -> None:
            self.start = self.end = 0.0

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.start = time.perf_counter()

        def on_train_end(self, trainer: Any, module: Any) -> None:
            self.end = time.perf_counter()

    loader = DataLoader(BatchedTensors(x, y), batch_size=batch, shuffle=True, collate_fn=lambda b: b,
                        generator=torch.Generator().manual_seed(0))
    clock = LightningClock()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, precision="bf16-mixed" if precision == "bf16" else "32-true",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[clock], num_sanity_val_steps=0)
    trainer.fit(Module(), loader)
    return clock.end - clock.start, trainer.global_step


RUNNERS = {"hand-written loop": hand_written, "torchbook Trainer": torchbook_trainer, "Lightning Trainer": lightning_trainer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=0, help="epochs per timing (0: about --steps steps)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per timing when --epochs is 0")
    parser.add_argument("--batch-size", type=int, default=32, help="the book's batch size")
    parser.add_argument("--repeats", type=int, default=7, help="timings per trainer; the best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=list(AUTOCAST))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name, x, y = load_images()
    steps_per_epoch = -(-len(x) // args.batch_size)
    epochs = args.epochs or max(1, round(args.steps / steps_per_epoch))
    print(f"data: {name}, {len(x):,} images of {x.shape[1]} pixels; model {x.shape[1]}-300-100-10; batch "
          f"{args.batch_size}; {epochs} epochs = {epochs * steps_per_epoch:,} steps per timing; "
          f"best of {args.repeats}; torch {torch.__version__}, {args.threads} thread(s)")
    for precision in args.precision:
        rates: dict[str, list[float]] = {label: [] for label in RUNNERS}
        labels = list(RUNNERS)
        for repeat in range(args.repeats):  # interleaved, the order rotating, so a slow spell hits every trainer
            for label in labels[repeat % 3 :] + labels[: repeat % 3]:
                seconds, steps = RUNNERS[label](x, y, epochs, args.batch_size, precision)
                rates[label].append(steps / seconds)
        best = {label: max(values) for label, values in rates.items()}
        paired = {other: statistics.median(o / h for o, h in zip(rates["torchbook Trainer"], rates[other]))
                  for other in ("hand-written loop", "Lightning Trainer")}
        print(f"\n{precision}:")
        for label, rate in best.items():
            print(f"  {label:<18} {rate:8.0f} steps/s (best)   all: {' '.join(f'{r:.0f}' for r in rates[label])}")
        hand, ours, lightning = best["hand-written loop"], best["torchbook Trainer"], best["Lightning Trainer"]
        print(f"  torchbook / hand-written: {ours / hand:.3f} (best vs best), {paired['hand-written loop']:.3f} "
              "(median of the same-repeat ratios)   goal: >= 0.95")
        print(f"  torchbook / Lightning:    {ours / lightning:.3f} (best vs best), {paired['Lightning Trainer']:.3f} "
              "(median of the same-repeat ratios)   goal: > 1")


if __name__ == "__main__":
    main()
