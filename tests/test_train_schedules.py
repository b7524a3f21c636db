"""Chapter 11's optimizers and schedules, each selected by name: optimizers match torch's own update, schedules
produce their learning-rate trajectory (closed forms written independently of torchbook.train.optim)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchbook.errors import UserInputError
from torchbook.train import Step, TrainConfig, Trainer
from torchbook.train.optim import OPTIMIZERS, SCHEDULES


def problem(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, (x @ torch.randn(5, 1, generator=g)).sin())


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))


BOOK_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),  # momentum and Nesterov (chapter 11)
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {"alpha": 0.9, "momentum": 0.5}),  # the book's rho=0.9
    "adam": (torch.optim.Adam, {}),
    "adamax": (torch.optim.Adamax, {}),
    "nadam": (torch.optim.NAdam, {}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.01}),
}


@pytest.mark.parametrize("name", sorted(BOOK_OPTIMIZERS))
def test_each_optimizer_by_name_makes_torchs_update(name: str) -> None:
    assert set(BOOK_OPTIMIZERS) <= set(OPTIMIZERS)
    cls, kwargs = BOOK_OPTIMIZERS[name]
    data = problem()
    extra = {k: v for k, v in kwargs.items() if k in ("momentum", "nesterov", "weight_decay")}
    config = TrainConfig(epochs=4, batch_size=64, lr=0.05, optimizer=name, progress=False, **extra)
    trainer = Trainer(net(), config, None, data, criterion=nn.MSELoss())
    trainer.fit()
    reference = net()
    opt = cls(reference.parameters(), lr=0.05, **kwargs)
    x, y = data.tensors
    for _ in range(4):  # one full batch per epoch: the data order does not matter
        opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        opt.step()
    for a, b in zip(trainer.model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def lr_trajectory(steps: int, **settings: Any) -> list[float]:
    """The learning rate in effect at each optimizer step of a run (recorded as each batch is processed)."""
    seen: list[float] = []
    criterion = nn.MSELoss()

    def step(model: nn.Module, batch: Any) -> Step:
        if model.training:
            seen.append(trainer.lr)
        x, y = batch
        return Step(criterion(model(x), y), count=len(x))

    data = problem(steps * 4)
    config = TrainConfig(epochs=1, batch_size=4, lr=0.1, progress=False, optimizer="sgd", **settings)
    config.validate()
    trainer = Trainer(net(), config, None, data, step=step)
    trainer.fit()
    assert len(seen) == steps
    return seen


def test_exponential_schedule() -> None:
    assert lr_trajectory(30, schedule="exponential", decay_steps=10) == pytest.approx(
        [0.1 * 0.1 ** (t / 10) for t in range(30)])
    assert lr_trajectory(20, schedule="exponential") == pytest.approx([0.1 * 0.1 ** (t / 20) for t in range(20)])


def test_cosine_with_warmup() -> None:
    def expected(t: int, warm: int = 5, total: int = 40) -> float:
        return 0.1 * (t + 1) / warm if t < warm else 0.05 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))

    lrs = lr_trajectory(40, schedule="cosine", warmup_steps=5)
    assert lrs == pytest.approx([expected(t) for t in range(40)])
    assert max(lrs) == pytest.approx(0.1) and lrs[-1] < 0.001


def test_cosine_with_warm_restarts() -> None:
    # SGDR: cycles of 4, 8, 16 steps after 2 warm-up steps; each cycle restarts at the peak lr.
    starts, expected = [2, 6, 14, 30], []
    for t in range(30):
        if t < 2:
            expected.append(0.1 * (t + 1) / 2)
            continue
        begin = max(s for s in starts if s <= t)
        period = starts[starts.index(begin) + 1] - begin
        expected.append(0.05 * (1 + math.cos(math.pi * (t - begin) / period)))
    lrs = lr_trajectory(30, schedule="cosine_restarts", warmup_steps=2, restart_steps=4, restart_mult=2)
    assert lrs == pytest.approx(expected)
    assert [lrs[s] for s in starts[:3]] == pytest.approx([0.1, 0.1, 0.1])


def test_onecycle() -> None:
    total, peak = 40, 11  # warmup_steps=12 steps up: the peak at step 11, then down to lr/25/1e4 at the last step
    lrs = lr_trajectory(total, schedule="onecycle", warmup_steps=12)

    def cos_anneal(start: float, end: float, fraction: float) -> float:
        return end + (start - end) / 2 * (1 + math.cos(math.pi * fraction))

    expected = [cos_anneal(0.1 / 25, 0.1, t / peak) if t <= peak
                else cos_anneal(0.1, 0.1 / 25 / 1e4, (t - peak) / (total - 1 - peak)) for t in range(total)]
    assert lrs == pytest.approx(expected)


def test_reduce_on_plateau_halves_lr_after_patience_epochs() -> None:
    """A validation loss that never improves: lr halves once `plateau_patience` epochs have gone by without
    improvement (record lr = the lr used during that epoch)."""
    criterion = nn.MSELoss()

    def step(model: nn.Module, batch: Any) -> Step:
        x, y = batch
        loss = criterion(model(x), y)
        return Step(loss if model.training else torch.tensor(1.0), count=len(x))

    data = problem(16)
    config = TrainConfig(epochs=8, batch_size=16, lr=0.1, schedule="plateau", plateau_patience=2, progress=False)
    trainer = Trainer(net(), config, None, data, data, step=step)
    lrs: list[float] = []

    class Record:
        def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
            lrs.append(record["lr"])

    trainer.callbacks.append(Record())
    trainer.fit()
    assert lrs == pytest.approx([0.1] * 4 + [0.05] * 3 + [0.025])


def test_every_schedule_is_selectable_and_unknown_names_are_refused() -> None:
    assert {"constant", "exponential", "cosine", "cosine_restarts", "onecycle", "plateau"} <= set(SCHEDULES)
    with pytest.raises(UserInputError, match="accepted: cosine"):
        TrainConfig(schedule="cosin").validate()
    with pytest.raises(UserInputError, match="accepted: nadam"):
        TrainConfig(optimizer="nadan").validate()
