"""Trainer callbacks: objects with any of `on_fit_start(trainer)`, `on_step_end(trainer, loss)`,
`on_epoch_end(trainer, record)`, `on_fit_end(trainer)`; setting `trainer.should_stop = True` stops training.

`extra_callbacks(...)` adds callbacks to every Trainer built inside a `with` block, so a tool that drives whole
recipes (the hyperparameter tuner) can watch their training without any change to the recipes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_EXTRA: ContextVar[tuple[Any, ...]] = ContextVar("torchbook_extra_callbacks", default=())


@contextmanager
def extra_callbacks(*callbacks: Any) -> Iterator[None]:
    """Every Trainer created inside this block also calls `callbacks` (after its own)."""
    token = _EXTRA.set(_EXTRA.get() + callbacks)
    try:
        yield
    finally:
        _EXTRA.reset(token)


def active_extra_callbacks() -> list[Any]:
    return list(_EXTRA.get())


class TensorBoardLogger:
    """TensorBoard events in `<run>/tensorboard` (`tensorboard=true`; view with `tensorboard --logdir runs`):
    `step/loss` and `step/lr` every `log_every` steps, `epoch/<metric>` for every epoch record (train_loss,
    val_loss, val_accuracy, lr...), and `weights/<name>` histograms at each epoch end (x axis: optimizer step). Written by rank 0 only; on resume, events after the checkpoint's step are purged."""

    def __init__(self) -> None:
        self.writer: Any = None

    def on_fit_start(self, trainer: Any) -> None:
        if trainer.run is None or not trainer.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        # Resumed: events logged after the checkpoint's step by the interrupted run are purged.
        purge = trainer.global_step + 1 if trainer.global_step else None
        self.writer = SummaryWriter(str(trainer.run.path / "tensorboard"), purge_step=purge)

    def on_step_end(self, trainer: Any, loss: float) -> None:
        every = trainer.config.log_every
        if self.writer is not None and every and trainer.global_step % every == 0:
            self.writer.add_scalar("step/loss", loss, trainer.global_step)
            self.writer.add_scalar("step/lr", trainer.lr, trainer.global_step)

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        if trainer.run is None:
            return
        weights = trainer.full_state_dict()  # collective under FSDP: every rank takes part
        if self.writer is None:
            return
        step = trainer.global_step
        for key, value in record.items():
            if key not in ("kind", "epoch", "step") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", value, step)  # epoch/train_loss, epoch/val_loss, epoch/lr...
        for name, tensor in weights.items():
            if tensor.is_floating_point() and tensor.numel():
                self.writer.add_histogram(f"weights/{name}", tensor.detach().float().cpu(), step)
        self.writer.flush()

    def on_fit_end(self, trainer: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
